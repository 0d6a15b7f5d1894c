/* Linker script of the guest programs (preprocessed by the Makefile for mailbox.h).
 * One flat image at the raw loader's address: RAM base 0x40000000 + 0x80000, entry at its
 * first byte; .bss follows the image in RAM and is not part of the .bin file. */
#include "mailbox.h"

OUTPUT_ARCH(aarch64)
ENTRY(_start)

/* Code and data in separate segments, so no linker sees (and warns about) an RWX segment. */
PHDRS
{
	text PT_LOAD FLAGS(5);          /* R X */
	data PT_LOAD FLAGS(6);          /* R W */
}

SECTIONS
{
	. = 0x40080000;
	__image_start = .;
	.text : {
		KEEP(*(.text.boot))
		*(.text .text.*)
	} :text
	.rodata : { *(.rodata .rodata.*) } :text
	. = ALIGN(4096);
	.data : {
		*(.data.idmap)
		*(.data .data.*)
	} :data
	. = ALIGN(16);
	__image_end = .;
	.bss (NOLOAD) : {
		__bss_start = .;
		*(.bss .bss.*)
		*(COMMON)
		. = ALIGN(16);
		__bss_end = .;
	} :data
	_end = .;
	/DISCARD/ : { *(.comment) *(.note*) *(.eh_frame*) *(.interp) *(.dynamic) }
}

ASSERT(_end <= AGENT_RAM_END, "guest program larger than the RAM it may use (AGENT_RAM_END)")
ASSERT(_start == __image_start, "_start must be the first byte of the image")
