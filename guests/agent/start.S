/*
 * The agent's assembly: entry for every CPU, the identity map and MMU, exception vectors,
 * the fault-tolerant access helpers, the timed-read loop and the PSCI call.
 *
 * Boot contract (raw image): EL1, MMU off, PC = first byte. The boot CPU gets x0 = DTB
 * address (ignored); secondaries come in through PSCI CPU_ON at the same entry with
 * x0 = AGENT_SECONDARY_CONTEXT. The code uses PC-relative addressing only, so it runs
 * wherever it is loaded on a 4 KiB boundary (it is linked at 0x40080000).
 */
#include "mailbox.h"

#define FRAME_SIZE      272             /* x0..x30, ELR_EL1, SPSR_EL1, padding to 16 bytes */
#define FRAME_ELR       248
#define FRAME_SPSR      256

/* Stage 1 identity map, 4 KiB granule, 39-bit VA, level 1 blocks of 1 GiB (Arm ARM D8). */
#define MAIR_VALUE      0xff00          /* Attr0 = Device-nGnRnE, Attr1 = Normal WB RW-allocate */
#define BLOCK           (1 << 0)
#define ATTR_DEVICE     (0 << 2)
#define ATTR_NORMAL     (1 << 2)
#define SH_INNER        (3 << 8)
#define AF              (1 << 10)
#define PXN             (1 << 53)
#define UXN             (1 << 54)
#define DEVICE_BLOCK    (BLOCK | ATTR_DEVICE | AF | PXN | UXN)
#define NORMAL_BLOCK    (BLOCK | ATTR_NORMAL | SH_INNER | AF | UXN)
/* TCR_EL1: T0SZ = 25, IRGN0/ORGN0 = WB RW-allocate, SH0 = inner, TG0 = 4K, EPD1 (no TTBR1
 * walks), TG1 = 4K; IPS is filled in from ID_AA64MMFR0_EL1.PARange. */
#define TCR_VALUE       (25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 30))
#define SCTLR_M         (1 << 0)
#define SCTLR_A         (1 << 1)
#define SCTLR_C         (1 << 2)
#define SCTLR_I         (1 << 12)

        .section .text.boot, "ax"
        .global _start
_start:
        msr     daifset, #0xf
        mov     x19, x0                         // DTB address or AGENT_SECONDARY_CONTEXT
        bl      mmu_on

        // CPU index from MPIDR_EL1 in KVM's default layout (arch/arm64/kvm/sys_regs.c,
        // reset_mpidr): Aff0 = index[3:0], Aff1 = index[11:4], Aff2 = index[19:12].
        mrs     x1, mpidr_el1
        ubfx    x2, x1, #0, #8
        ubfx    x3, x1, #8, #8
        ubfx    x4, x1, #16, #8
        add     x2, x2, x3, lsl #4
        add     x2, x2, x4, lsl #12
        cmp     x2, #AGENT_MAX_CPUS
        b.hs    bad_cpu

        adrp    x3, agent_stacks
        add     x3, x3, :lo12:agent_stacks
        add     x4, x2, #1
        lsl     x4, x4, #AGENT_STACK_SHIFT
        add     x3, x3, x4
        mov     sp, x3                          // top of this CPU's stack
        mov     x20, x2

        movz    x5, #(AGENT_SECONDARY_CONTEXT & 0xffff)
        movk    x5, #(AGENT_SECONDARY_CONTEXT >> 16), lsl #16
        cmp     x19, x5
        cset    x21, eq                         // x21 = 1 on a secondary
        cbnz    x21, 2f
        // Boot CPU only, before any secondary exists: zero .bss (this includes the stacks).
        // The MMU and caches are on, so the zeroes are coherent with every later access.
        adrp    x6, __bss_start
        add     x6, x6, :lo12:__bss_start
        adrp    x7, __bss_end
        add     x7, x7, :lo12:__bss_end
1:      cmp     x6, x7
        b.hs    2f
        stp     xzr, xzr, [x6], #16
        b       1b
2:
        adrp    x6, agent_vectors
        add     x6, x6, :lo12:agent_vectors
        msr     vbar_el1, x6
        isb
        mov     x0, x20                         // CPU index
        mov     x1, x21                         // secondary?
        bl      agent_main
        b       agent_park

// A CPU index beyond the stacks: report it without touching memory, then park.
bad_cpu:
        movz    x6, #(MAILBOX_BASE >> 16), lsl #16
        str     xzr, [x6, #MB_PANIC_FAR]
        adr     x7, _start
        str     x7, [x6, #MB_PANIC_ELR]
        mov     x7, #PANIC_KIND_BAD_CPU
        str     x7, [x6, #MB_PANIC_KIND]
        str     x1, [x6, #MB_PANIC]
        // fall through

// Stop for good: everything masked, sleep. A wake-up (a VMM signal, a pending interrupt)
// only comes back here.
        .global agent_park
agent_park:
        msr     daifset, #0xf
3:      wfi
        b       3b

// Turn on the MMU and caches with the static identity map. Leaf: clobbers x0, x1 only.
// With the MMU off every data access would be Device memory: uncached (slow on hardware, and
// not coherent with the host's cached view of guest RAM, where ITS tables, command queues
// and counters live), and unaligned accesses would fault.
mmu_on:
        mov     x0, #MAIR_VALUE
        msr     mair_el1, x0
        mrs     x1, id_aa64mmfr0_el1
        and     x1, x1, #0xf                    // PARange -> TCR_EL1.IPS
        ldr     x0, =TCR_VALUE
        orr     x0, x0, x1, lsl #32
        msr     tcr_el1, x0
        adrp    x0, agent_idmap
        msr     ttbr0_el1, x0
        isb
        tlbi    vmalle1                         // TLB contents are UNKNOWN out of reset
        ic      iallu
        dsb     nsh
        isb
        mrs     x0, sctlr_el1
        ldr     x1, =(SCTLR_M | SCTLR_C | SCTLR_I)
        orr     x0, x0, x1
        bic     x0, x0, #SCTLR_A
        msr     sctlr_el1, x0
        isb
        ret
        .ltorg

/*
 * Loads and stores for READ/WRITE requests. A synchronous abort on the first instruction of
 * any of them is turned into a request error by the C handler (agent_sync): it records ESR_EL1,
 * returns 0 in x0 and resumes at the `ret`. Nothing else may live in this range.
 */
        .text
        .balign 16
        .global agent_fixup_start, agent_fixup_end
        .global agent_ld8, agent_ld16, agent_ld32, agent_ld64
        .global agent_st8, agent_st16, agent_st32, agent_st64
agent_fixup_start:
agent_ld8:      ldrb    w0, [x0]
                ret
agent_ld16:     ldrh    w0, [x0]
                ret
agent_ld32:     ldr     w0, [x0]
                ret
agent_ld64:     ldr     x0, [x0]
                ret
agent_st8:      strb    w1, [x0]
                ret
agent_st16:     strh    w1, [x0]
                ret
agent_st32:     str     w1, [x0]
                ret
agent_st64:     str     x1, [x0]
                ret
agent_fixup_end:

/*
 * u64 agent_timed_read(u64 addr, u64 width, u64 count): CNTVCT ticks taken by `count` loads
 * of `width` bytes from addr (count >= 1, width 1/2/4/8: the caller checks, and has done one
 * load through the fault-tolerant helpers first). The ISBs keep the counter reads from being
 * executed ahead of, or behind, the loads they bracket.
 */
        .global agent_timed_read
agent_timed_read:
        isb
        mrs     x4, cntvct_el0
        isb
        cmp     x1, #1
        b.eq    1f
        cmp     x1, #2
        b.eq    2f
        cmp     x1, #4
        b.eq    4f
8:      ldr     x5, [x0]
        subs    x2, x2, #1
        b.ne    8b
        b       9f
4:      ldr     w5, [x0]
        subs    x2, x2, #1
        b.ne    4b
        b       9f
2:      ldrh    w5, [x0]
        subs    x2, x2, #1
        b.ne    2b
        b       9f
1:      ldrb    w5, [x0]
        subs    x2, x2, #1
        b.ne    1b
9:      dsb     sy
        isb
        mrs     x0, cntvct_el0
        sub     x0, x0, x4
        ret

// u64 agent_psci(u64 function_id, u64 a1, u64 a2, u64 a3): SMCCC call over HVC (KVM's PSCI
// conduit). x4..x17 may be clobbered by the callee per SMCCC: all caller-saved in AAPCS64.
        .global agent_psci
agent_psci:
        hvc     #0
        ret

/* Exception vectors (Arm ARM D1.10.2): 16 slots of 0x80 bytes. Each saves x0/x1, puts its
 * slot number in x1 and joins exception_common, which calls agent_exception(frame, slot). */
.macro ventry slot
        .balign 0x80
        sub     sp, sp, #FRAME_SIZE
        stp     x0, x1, [sp, #0]
        mov     x1, #\slot
        b       exception_common
.endm

        .balign 2048
        .global agent_vectors
agent_vectors:
        ventry  0       // current EL, SP_EL0: sync
        ventry  1       //                     IRQ
        ventry  2       //                     FIQ
        ventry  3       //                     SError
        ventry  4       // current EL, SP_ELx: sync (the agent runs here: EL1h)
        ventry  5       //                     IRQ
        ventry  6       //                     FIQ
        ventry  7       //                     SError
        ventry  8       // lower EL, AArch64
        ventry  9
        ventry  10
        ventry  11
        ventry  12      // lower EL, AArch32
        ventry  13
        ventry  14
        ventry  15

exception_common:
        stp     x2, x3, [sp, #16]
        stp     x4, x5, [sp, #32]
        stp     x6, x7, [sp, #48]
        stp     x8, x9, [sp, #64]
        stp     x10, x11, [sp, #80]
        stp     x12, x13, [sp, #96]
        stp     x14, x15, [sp, #112]
        stp     x16, x17, [sp, #128]
        stp     x18, x19, [sp, #144]
        stp     x20, x21, [sp, #160]
        stp     x22, x23, [sp, #176]
        stp     x24, x25, [sp, #192]
        stp     x26, x27, [sp, #208]
        stp     x28, x29, [sp, #224]
        mrs     x2, elr_el1
        stp     x30, x2, [sp, #240]
        mrs     x3, spsr_el1
        str     x3, [sp, #FRAME_SPSR]
        mov     x0, sp
        bl      agent_exception
        ldr     x3, [sp, #FRAME_SPSR]
        msr     spsr_el1, x3
        ldp     x30, x2, [sp, #240]
        msr     elr_el1, x2
        ldp     x0, x1, [sp, #0]
        ldp     x2, x3, [sp, #16]
        ldp     x4, x5, [sp, #32]
        ldp     x6, x7, [sp, #48]
        ldp     x8, x9, [sp, #64]
        ldp     x10, x11, [sp, #80]
        ldp     x12, x13, [sp, #96]
        ldp     x14, x15, [sp, #112]
        ldp     x16, x17, [sp, #128]
        ldp     x18, x19, [sp, #144]
        ldp     x20, x21, [sp, #160]
        ldp     x22, x23, [sp, #176]
        ldp     x24, x25, [sp, #192]
        ldp     x26, x27, [sp, #208]
        ldp     x28, x29, [sp, #224]
        add     sp, sp, #FRAME_SIZE
        eret

/* Level 1 table of the identity map: [0, 1 GiB) Device-nGnRnE (all the machine's MMIO),
 * [1 GiB, 256 GiB) Normal write-back (RAM), [256 GiB, 512 GiB) Device again (where a
 * QEMU-virt-like map puts its high MMIO). Built at assembly time, so it is ready before the
 * MMU goes on. */
        .section .data.idmap, "aw"
        .balign 4096
agent_idmap:
        .quad   DEVICE_BLOCK
        .set    gib, 1
        .rept   255
        .quad   NORMAL_BLOCK | (gib << 30)
        .set    gib, gib + 1
        .endr
        .rept   256
        .quad   DEVICE_BLOCK | (gib << 30)
        .set    gib, gib + 1
        .endr

        .bss
        .balign 16
        .global agent_stacks
agent_stacks:
        .skip   AGENT_MAX_CPUS << AGENT_STACK_SHIFT
