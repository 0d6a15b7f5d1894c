/*
 * The agent's mailbox protocol: the one definition shared by the guest (C and assembly)
 * and, through a test that parses this file, by kvmits/machine/agent/protocol.py.
 * guests/README.md explains each register and request.
 *
 * Only "#define NAME value" lines with a decimal or hex value: the Python side reads them.
 */
#ifndef KVMITS_MAILBOX_H
#define KVMITS_MAILBOX_H

/* Protocol version: written to MB_VERSION before the configuration reads. */
#define AGENT_VERSION           1

/* Guest-physical page with no memory behind it: every access exits to the VMM. */
#define MAILBOX_BASE            0x0A000000

/* Register offsets (64-bit accesses unless noted). */
#define MB_REQ                  0x00    /* R: next request opcode for this vCPU, 0 = WAIT */
#define MB_ARG0                 0x08    /* R: arguments of the current request */
#define MB_ARG1                 0x10
#define MB_ARG2                 0x18
#define MB_ARG3                 0x20
#define MB_RESULT               0x40    /* W: completes the current request with a value */
#define MB_IRQ                  0x48    /* W, 32-bit: this vCPU took interrupt INTID */
#define MB_HELLO                0x50    /* W: this CPU is up and ready (value = MPIDR_EL1) */
#define MB_ERROR                0x58    /* W: completes the current request with an error */
#define MB_GICD_BASE            0x60    /* R: distributor base (0 = do not touch) */
#define MB_GICR_BASE            0x68    /* R: this vCPU's redistributor (RD_base, 0 = none) */
#define MB_PANIC                0x70    /* W: fatal: value = ESR_EL1 (written last) */
#define MB_PANIC_FAR            0x78    /* W: FAR_EL1 of the panic (written first) */
#define MB_PANIC_ELR            0x80    /* W: ELR_EL1 of the panic */
#define MB_PANIC_KIND           0x88    /* W: what went wrong (PANIC_KIND_*) */
#define MB_IDLE_US              0x90    /* R: bound of one idle WFI in microseconds (0 = none) */
#define MB_VERSION              0x98    /* W: AGENT_VERSION, before the configuration reads */

/* Request opcodes (MB_REQ). Arguments in MB_ARG0.. in the order given. */
#define OP_WAIT                 0       /* nothing to do: idle in WFI, then poll again */
#define OP_READ                 1       /* (addr, width 1/2/4/8) -> value */
#define OP_WRITE                2       /* (addr, width, value) -> 0, then DSB SY */
#define OP_SYSREG_READ          3       /* (SYSREG_* id) -> value */
#define OP_SYSREG_WRITE         4       /* (SYSREG_* id, value) -> 0 */
#define OP_CPU_ON               5       /* (target MPIDR affinity) -> PSCI return value */
#define OP_SYSTEM_OFF           6       /* () -> no result: PSCI SYSTEM_OFF */
#define OP_IRQ_MODE             7       /* (IRQ_MODE_*, counter table GPA, counters) -> old mode */
#define OP_TIMED_READ           8       /* (addr, width, count) -> CNTVCT ticks for count reads */
#define OP_PING                 9       /* (value) -> value */

/* SYSREG_READ / SYSREG_WRITE ids. R = readable, W = writable. */
#define SYSREG_ICC_IAR1_EL1     1       /* R  (acknowledges: the host then owns the EOI) */
#define SYSREG_ICC_EOIR1_EL1    2       /* W */
#define SYSREG_ICC_HPPIR1_EL1   3       /* R */
#define SYSREG_ICC_RPR_EL1      4       /* R */
#define SYSREG_ICC_PMR_EL1      5       /* RW */
#define SYSREG_ICC_BPR1_EL1     6       /* RW */
#define SYSREG_ICC_CTLR_EL1     7       /* RW */
#define SYSREG_ICC_SRE_EL1      8       /* RW */
#define SYSREG_ICC_IGRPEN1_EL1  9       /* RW */
#define SYSREG_ICC_DIR_EL1      10      /* W */
#define SYSREG_ICC_SGI1R_EL1    11      /* W  (sends an SGI) */
#define SYSREG_ICC_AP1R0_EL1    12      /* R */
#define SYSREG_MPIDR_EL1        13      /* R */
#define SYSREG_CNTVCT_EL0       14      /* R */
#define SYSREG_CNTFRQ_EL0       15      /* R */
#define SYSREG_ID_AA64PFR0_EL1  16      /* R */

/* IRQ_MODE modes: what the IRQ handler does with an acknowledged INTID. */
#define IRQ_MODE_REPORT         0       /* write it to MB_IRQ (one exit per interrupt) */
#define IRQ_MODE_COUNT          1       /* LPIs: u32 counter += 1 in guest RAM, no exit */
#define IRQ_MODE_MASKED         2       /* PSTATE.I stays set: the host polls ICC_IAR1_EL1 */

/* MB_ERROR values: code in bits [7:0], detail above. */
#define ERR_UNKNOWN_OP          1       /* detail = the opcode */
#define ERR_BAD_ARG             2       /* detail = index of the bad argument */
#define ERR_FAULT               3       /* detail = ESR_EL1 of the synchronous abort */
#define ERR_PSCI                4       /* SYSTEM_OFF returned: detail = PSCI return value */
#define ERR_DETAIL_SHIFT        8

/* MB_PANIC_KIND: 0..15 = the exception vector slot taken (offset from VBAR_EL1 / 0x80);
 * agent-detected fatal conditions from 0x100 on. */
#define PANIC_KIND_VECTOR_MAX   15
#define PANIC_KIND_NO_SYSREG_GIC 0x100  /* ICC_SRE_EL1.SRE stays 0: no GICv3 system registers */
#define PANIC_KIND_BAD_CPU      0x101   /* MPIDR_EL1 gives a CPU index >= AGENT_MAX_CPUS;
                                         * MB_PANIC value = MPIDR_EL1 */

/* Layout limits. */
#define AGENT_MAX_CPUS          64
#define AGENT_STACK_SHIFT       13      /* 8 KiB of stack per CPU */
/* PSCI CPU_ON context_id the agent passes to secondaries (arrives in x0): tells them from the
 * boot CPU, whose x0 is the DTB address (in RAM, never this value). */
#define AGENT_SECONDARY_CONTEXT 0x5EC0DA7A
/* First guest-physical address the agent never touches: the agent's image, data, page table
 * and stacks all lie below it (the linker script checks). RAM from here up is the host's. */
#define AGENT_RAM_END           0x40200000

/* Counters in IRQ_MODE_COUNT: LPI INTID n is counted in the u32 at table + 4 * (n - 8192),
 * for n - 8192 < the number of counters given; other INTIDs are still reported. */
#define LPI_BASE                8192

#endif
