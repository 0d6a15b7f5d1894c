/*
 * hello: the smallest useful guest for `kvmits run`. Prints one line on the PL011 console with
 * what the raw loader handed over (exception level, MPIDR, DTB address and magic), then powers
 * the VM off through PSCI SYSTEM_OFF. Runs with the MMU off; needs no stack and no RAM writes.
 */
#define UART_BASE       0x09000000      /* PL011 in the machine's map */
#define UARTDR          0x00
#define UARTFR          0x18
#define UARTFR_TXFF     (1 << 5)
#define FDT_MAGIC_LE    0xedfe0dd0      /* 0xd00dfeed, big-endian in memory */
#define PSCI_SYSTEM_OFF 0x84000008

        .section .text.boot, "ax"
        .global _start
_start:
        msr     daifset, #0xf
        mov     x19, x0                         // DTB address
        movz    x20, #(UART_BASE >> 16), lsl #16

        adr     x1, msg_hello
        bl      puts
        mrs     x0, CurrentEL
        lsr     x0, x0, #2
        add     w0, w0, #'0'
        bl      putc
        adr     x1, msg_mpidr
        bl      puts
        mrs     x0, mpidr_el1
        bl      puthex
        adr     x1, msg_dtb
        bl      puts
        mov     x0, x19
        bl      puthex
        adr     x1, msg_bad
        cbz     x19, 1f
        ldr     w2, [x19]
        movz    w3, #(FDT_MAGIC_LE & 0xffff)
        movk    w3, #(FDT_MAGIC_LE >> 16), lsl #16
        cmp     w2, w3
        b.ne    1f
        adr     x1, msg_ok
1:      bl      puts

        movz    x0, #(PSCI_SYSTEM_OFF & 0xffff)
        movk    x0, #(PSCI_SYSTEM_OFF >> 16), lsl #16
        hvc     #0
        adr     x1, msg_off_failed              // SYSTEM_OFF returned: say so and stop here
        bl      puts
2:      wfi
        b       2b

// putc(w0): wait while the TX FIFO is full, then write the byte. Clobbers w9.
putc:
        ldr     w9, [x20, #UARTFR]
        tbnz    w9, #5, putc
        strb    w0, [x20, #UARTDR]
        ret

// puts(x1 = NUL-terminated string). Clobbers x0, x1, x9, x10.
puts:
        mov     x10, x30
3:      ldrb    w0, [x1], #1
        cbz     w0, 4f
        bl      putc
        b       3b
4:      ret     x10

// puthex(x0): "0x" and 16 hex digits. Clobbers x0..x3, x9, x11, x12.
puthex:
        mov     x11, x30
        mov     x12, x0
        mov     w0, #'0'
        bl      putc
        mov     w0, #'x'
        bl      putc
        mov     x2, #60
5:      lsr     x3, x12, x2
        and     x3, x3, #0xf
        cmp     x3, #10
        add     x0, x3, #'0'
        add     x3, x3, #('a' - 10)
        csel    x0, x3, x0, hs
        bl      putc
        subs    x2, x2, #4
        b.pl    5b
        ret     x11

msg_hello:      .asciz  "kvmits hello: running at EL"
msg_mpidr:      .asciz  ", MPIDR_EL1 "
msg_dtb:        .asciz  ", DTB at "
msg_ok:         .asciz  " (FDT magic ok)\r\npowering off\r\n"
msg_bad:        .asciz  " (no FDT magic there)\r\npowering off\r\n"
msg_off_failed: .asciz  "PSCI SYSTEM_OFF returned\r\n"
