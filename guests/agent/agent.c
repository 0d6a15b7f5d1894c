/*
 * The kvmits guest agent: the guest's hands for a driver that lives on the host.
 *
 * Each CPU sets up its GICv3 CPU interface (and the boot CPU the distributor), says HELLO, then
 * serves requests the host posts in the mailbox (guests/include/mailbox.h, guests/README.md):
 * loads and stores at any guest-physical address, a fixed set of system registers, PSCI.
 * Interrupts are acknowledged here and reported to the host (or counted in guest RAM).
 */
#include "arm64.h"
#include "mailbox.h"

/* GICv3 registers the agent touches itself (Arm IHI 0069, 12.9 and 12.11). */
#define GICD_CTLR               0x0000
#define GICD_CTLR_ENABLE_GRP1   (1u << 1)       /* EnableGrp1 (DS = 1) / EnableGrp1NS (DS = 0) */
#define GICD_CTLR_ARE           (1u << 4)       /* ARE (DS = 1) / ARE_NS (DS = 0) */
#define GICD_CTLR_RWP           (1u << 31)
#define GICR_WAKER              0x0014
#define GICR_WAKER_PROCESSOR_SLEEP (1u << 1)
#define GICR_WAKER_CHILDREN_ASLEEP (1u << 2)
#define GICR_SGI_BASE           0x10000         /* SGI_base frame, after the 64 KiB RD_base frame */
#define GICR_IGROUPR0           0x0080
#define GICR_ISENABLER0         0x0100
#define GICR_IPRIORITYR6        0x0418          /* priorities of INTIDs 24..27 */

/* The EL1 virtual timer's PPI in the machine's device tree (arch timer, "interrupts" entry 3). */
#define TIMER_PPI               27
#define TIMER_PRIORITY          0x80
#define CNTV_CTL_ENABLE         1

#define SPURIOUS_FIRST          1020
#define SPURIOUS_LAST           1023

#define PSCI_CPU_ON_64          0xC4000003ul    /* Arm DEN 0022, 5.1 */
#define PSCI_SYSTEM_OFF         0x84000008ul

#define ESR_EC(esr)             (((esr) >> 26) & 0x3f)
#define ESR_EC_DABT_CUR         0x25            /* data abort without a change of EL */

#define VECTOR_SYNC_SPX         4
#define VECTOR_IRQ_SPX          5

/* From start.S. */
extern char _start[], agent_fixup_start[], agent_fixup_end[];
extern u64 agent_ld8(u64 addr), agent_ld16(u64 addr), agent_ld32(u64 addr), agent_ld64(u64 addr);
extern void agent_st8(u64 addr, u64 v), agent_st16(u64 addr, u64 v);
extern void agent_st32(u64 addr, u64 v), agent_st64(u64 addr, u64 v);
extern u64 agent_timed_read(u64 addr, u64 width, u64 count);
extern u64 agent_psci(u64 fn, u64 a1, u64 a2, u64 a3);
extern void agent_park(void) __attribute__((noreturn));

/* The exception frame built by exception_common in start.S. */
struct frame {
	u64 x[31];
	u64 elr;
	u64 spsr;
	u64 pad;
};

struct percpu {
	u64 index;
	u64 mpidr;
	u64 gicr;                       /* this CPU's RD_base, 0 if the host gave none */
	u64 idle_ticks;                 /* bound of one idle WFI in CNTVCT ticks, 0 = none */
	u32 *counters;                  /* IRQ_MODE_COUNT: u32 per LPI from LPI_BASE */
	u64 n_counters;
	volatile u32 mode;              /* IRQ_MODE_*: read by the IRQ handler */
	volatile u32 faulted;           /* set by agent_sync when a request access aborts */
	volatile u64 fault_esr;
	u32 in_panic;
};

static struct percpu percpu[AGENT_MAX_CPUS];

static inline struct percpu *this_cpu(void)
{
	return (struct percpu *)read_sysreg("tpidr_el1");
}

static inline u64 mb_read(u64 off)
{
	return mmio_read64(MAILBOX_BASE + off);
}

static inline void mb_write(u64 off, u64 v)
{
	mmio_write64(MAILBOX_BASE + off, v);
}

/* Report a fatal condition and stop this CPU for good (see MB_PANIC in guests/README.md). */
static void __attribute__((noreturn)) panic(u64 kind, u64 value, u64 far, u64 elr)
{
	struct percpu *pc = this_cpu();

	__asm__ volatile("msr daifset, #0xf" : : : "memory");
	if (!pc->in_panic) {            /* a fault while reporting one must not loop */
		pc->in_panic = 1;
		mb_write(MB_PANIC_FAR, far);
		mb_write(MB_PANIC_ELR, elr);
		mb_write(MB_PANIC_KIND, kind);
		mb_write(MB_PANIC, value);
	}
	/* Nothing may wake the parked CPU into a busy loop: timer off, group 1 off. */
	write_sysreg("cntv_ctl_el0", 0);
	write_sysreg(ICC_IGRPEN1_EL1, 0);
	isb();
	agent_park();
}

static void handle_irqs(struct percpu *pc)
{
	for (;;) {
		u64 iar = read_sysreg(ICC_IAR1_EL1);
		u32 intid = iar & 0xffffff;
		u64 n;

		if (intid >= SPURIOUS_FIRST && intid <= SPURIOUS_LAST)
			return;
		if (intid == TIMER_PPI) {
			/* Only the bound of an idle WFI: drop its level and go on. */
			write_sysreg("cntv_ctl_el0", 0);
			isb();
			write_sysreg(ICC_EOIR1_EL1, iar);
			continue;
		}
		/* EOI (priority drop and deactivate, EOImode 0) before the report: when the host
		 * sees the report the interrupt is inactive, so a MOVI/MOVALL it sends in response is
		 * not held back by KVM keeping an active interrupt on its vCPU
		 * (docs/userspace-its.md, "What the kernel enforces"). */
		write_sysreg(ICC_EOIR1_EL1, iar);
		isb();
		n = (u64)intid - LPI_BASE;
		if (pc->mode == IRQ_MODE_COUNT && intid >= LPI_BASE && n < pc->n_counters)
			__atomic_fetch_add(&pc->counters[n], 1, __ATOMIC_RELAXED);
		else
			mmio_write32(MAILBOX_BASE + MB_IRQ, intid);
	}
}

/* Called by exception_common for every vector slot. */
void agent_exception(struct frame *f, u64 slot)
{
	struct percpu *pc = this_cpu();
	u64 esr, far;

	if (slot == VECTOR_IRQ_SPX) {
		handle_irqs(pc);
		return;
	}
	esr = read_sysreg("esr_el1");
	far = read_sysreg("far_el1");
	if (slot == VECTOR_SYNC_SPX && ESR_EC(esr) == ESR_EC_DABT_CUR &&
	    f->elr >= (u64)agent_fixup_start && f->elr < (u64)agent_fixup_end) {
		/* A READ/WRITE request's own access aborted: the request fails, the agent lives. */
		pc->fault_esr = esr;
		pc->faulted = 1;
		f->x[0] = 0;
		f->elr += 4;
		return;
	}
	panic(slot, esr, far, f->elr);
}

static void cpu_interface_init(void)
{
	u64 sre = read_sysreg(ICC_SRE_EL1);

	if (!(sre & 1)) {
		write_sysreg(ICC_SRE_EL1, sre | 1);
		isb();
		sre = read_sysreg(ICC_SRE_EL1);
		if (!(sre & 1))
			panic(PANIC_KIND_NO_SYSREG_GIC, sre, 0, 0);
	}
	write_sysreg(ICC_PMR_EL1, 0xff);
	write_sysreg(ICC_BPR1_EL1, 0);
	write_sysreg(ICC_CTLR_EL1, 0);          /* EOImode 0: EOIR drops priority and deactivates */
	write_sysreg(ICC_IGRPEN1_EL1, 1);
	isb();
}

static void distributor_init(u64 gicd)
{
	/* KVM's vGICv3 has one security state (GICD_CTLR.DS = 1, ARE RAO/WI): bits 1 and 4 are
	 * EnableGrp1 and ARE, at the same places as EnableGrp1NS and ARE_NS with DS = 0. */
	u32 ctlr = mmio_read32(gicd + GICD_CTLR);
	int i;

	mmio_write32(gicd + GICD_CTLR, ctlr | GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
	for (i = 0; i < 100000 && (mmio_read32(gicd + GICD_CTLR) & GICD_CTLR_RWP); i++)
		;
}

static void redistributor_init(u64 gicr)
{
	u64 sgi = gicr + GICR_SGI_BASE;
	u32 v;
	int i;

	/* Wake the redistributor (12.11.42; KVM's is always awake: RAZ/WI). */
	v = mmio_read32(gicr + GICR_WAKER);
	mmio_write32(gicr + GICR_WAKER, v & ~GICR_WAKER_PROCESSOR_SLEEP);
	for (i = 0; i < 100000 && (mmio_read32(gicr + GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP); i++)
		;
	/* The idle timer's PPI: group 1, middle priority, enabled. */
	mmio_write32(sgi + GICR_IGROUPR0, mmio_read32(sgi + GICR_IGROUPR0) | (1u << TIMER_PPI));
	v = mmio_read32(sgi + GICR_IPRIORITYR6);
	v = (v & 0x00ffffffu) | ((u32)TIMER_PRIORITY << 24);
	mmio_write32(sgi + GICR_IPRIORITYR6, v);
	mmio_write32(sgi + GICR_ISENABLER0, 1u << TIMER_PPI);
	dsb_sy();
}

/* An MB_ERROR value: never 0, since every ERR_* code is. */
static inline u64 error(u64 code, u64 detail)
{
	return code | (detail << ERR_DETAIL_SHIFT);
}

static inline int width_ok(u64 w)
{
	return w == 1 || w == 2 || w == 4 || w == 8;
}

static u64 guest_load(u64 addr, u64 width)
{
	switch (width) {
	case 1: return agent_ld8(addr);
	case 2: return agent_ld16(addr);
	case 4: return agent_ld32(addr);
	default: return agent_ld64(addr);
	}
}

static void guest_store(u64 addr, u64 width, u64 v)
{
	switch (width) {
	case 1: agent_st8(addr, v); break;
	case 2: agent_st16(addr, v); break;
	case 4: agent_st32(addr, v); break;
	default: agent_st64(addr, v); break;
	}
}

/* Returns 0 and sets *v, or -1 for an id that cannot be read. */
static int sysreg_read(u64 id, u64 *v)
{
	switch (id) {
	case SYSREG_ICC_IAR1_EL1:       *v = read_sysreg(ICC_IAR1_EL1); break;
	case SYSREG_ICC_HPPIR1_EL1:     *v = read_sysreg(ICC_HPPIR1_EL1); break;
	case SYSREG_ICC_RPR_EL1:        *v = read_sysreg(ICC_RPR_EL1); break;
	case SYSREG_ICC_PMR_EL1:        *v = read_sysreg(ICC_PMR_EL1); break;
	case SYSREG_ICC_BPR1_EL1:       *v = read_sysreg(ICC_BPR1_EL1); break;
	case SYSREG_ICC_CTLR_EL1:       *v = read_sysreg(ICC_CTLR_EL1); break;
	case SYSREG_ICC_SRE_EL1:        *v = read_sysreg(ICC_SRE_EL1); break;
	case SYSREG_ICC_IGRPEN1_EL1:    *v = read_sysreg(ICC_IGRPEN1_EL1); break;
	case SYSREG_ICC_AP1R0_EL1:      *v = read_sysreg(ICC_AP1R0_EL1); break;
	case SYSREG_MPIDR_EL1:          *v = read_sysreg("mpidr_el1"); break;
	case SYSREG_CNTVCT_EL0:         isb(); *v = read_sysreg("cntvct_el0"); break;
	case SYSREG_CNTFRQ_EL0:         *v = read_sysreg("cntfrq_el0"); break;
	case SYSREG_ID_AA64PFR0_EL1:    *v = read_sysreg("id_aa64pfr0_el1"); break;
	default: return -1;
	}
	return 0;
}

/* Returns 0, or -1 for an id that cannot be written. */
static int sysreg_write(u64 id, u64 v)
{
	switch (id) {
	case SYSREG_ICC_EOIR1_EL1:      write_sysreg(ICC_EOIR1_EL1, v); break;
	case SYSREG_ICC_PMR_EL1:        write_sysreg(ICC_PMR_EL1, v); break;
	case SYSREG_ICC_BPR1_EL1:       write_sysreg(ICC_BPR1_EL1, v); break;
	case SYSREG_ICC_CTLR_EL1:       write_sysreg(ICC_CTLR_EL1, v); break;
	case SYSREG_ICC_SRE_EL1:        write_sysreg(ICC_SRE_EL1, v); break;
	case SYSREG_ICC_IGRPEN1_EL1:    write_sysreg(ICC_IGRPEN1_EL1, v); break;
	case SYSREG_ICC_DIR_EL1:        write_sysreg(ICC_DIR_EL1, v); break;
	case SYSREG_ICC_SGI1R_EL1:      write_sysreg(ICC_SGI1R_EL1, v); break;
	default: return -1;
	}
	isb();
	return 0;
}

static u64 set_irq_mode(struct percpu *pc, u64 mode, u64 table, u64 n, u64 *err)
{
	u64 old = pc->mode;

	if (mode > IRQ_MODE_MASKED) {
		*err = error(ERR_BAD_ARG, 0);
	} else if (mode == IRQ_MODE_COUNT && (table == 0 || (table & 3))) {
		*err = error(ERR_BAD_ARG, 1);
	} else if (mode == IRQ_MODE_COUNT && n == 0) {
		*err = error(ERR_BAD_ARG, 2);
	} else {
		/* The IRQ handler runs on this CPU: switch with IRQs masked, table before mode. */
		irq_mask();
		pc->counters = (u32 *)table;
		pc->n_counters = mode == IRQ_MODE_COUNT ? n : 0;
		pc->mode = (u32)mode;
	}
	return old;
}

/* Access guest memory or MMIO for a request; on an abort, set *err and return 0. */
static u64 checked_load(struct percpu *pc, u64 addr, u64 width, u64 *err)
{
	u64 v;

	pc->faulted = 0;
	v = guest_load(addr, width);
	if (pc->faulted)
		*err = error(ERR_FAULT, pc->fault_esr & 0xffffffffu);
	return v;
}

/* Serve one request: returns the result, or sets *err (then the result is not used). */
static u64 serve(struct percpu *pc, u64 op, u64 *err)
{
	u64 a0, a1, a2, v = 0;

	switch (op) {
	case OP_READ:
		a0 = mb_read(MB_ARG0);
		a1 = mb_read(MB_ARG1);
		if (!width_ok(a1))
			*err = error(ERR_BAD_ARG, 1);
		else
			v = checked_load(pc, a0, a1, err);
		break;
	case OP_WRITE:
		a0 = mb_read(MB_ARG0);
		a1 = mb_read(MB_ARG1);
		a2 = mb_read(MB_ARG2);
		if (!width_ok(a1)) {
			*err = error(ERR_BAD_ARG, 1);
			break;
		}
		pc->faulted = 0;
		guest_store(a0, a1, a2);
		dsb_sy();
		if (pc->faulted)
			*err = error(ERR_FAULT, pc->fault_esr & 0xffffffffu);
		break;
	case OP_SYSREG_READ:
		if (sysreg_read(mb_read(MB_ARG0), &v))
			*err = error(ERR_BAD_ARG, 0);
		break;
	case OP_SYSREG_WRITE:
		a0 = mb_read(MB_ARG0);
		if (sysreg_write(a0, mb_read(MB_ARG1)))
			*err = error(ERR_BAD_ARG, 0);
		break;
	case OP_CPU_ON:
		v = agent_psci(PSCI_CPU_ON_64, mb_read(MB_ARG0), (u64)_start, AGENT_SECONDARY_CONTEXT);
		break;
	case OP_SYSTEM_OFF:
		v = agent_psci(PSCI_SYSTEM_OFF, 0, 0, 0);
		*err = error(ERR_PSCI, v & 0xffffffffu);        /* only if PSCI returned */
		break;
	case OP_IRQ_MODE:
		a0 = mb_read(MB_ARG0);
		a1 = mb_read(MB_ARG1);
		v = set_irq_mode(pc, a0, a1, mb_read(MB_ARG2), err);
		break;
	case OP_TIMED_READ:
		a0 = mb_read(MB_ARG0);
		a1 = mb_read(MB_ARG1);
		a2 = mb_read(MB_ARG2);
		if (!width_ok(a1))
			*err = error(ERR_BAD_ARG, 1);
		else if (a2 == 0)
			*err = error(ERR_BAD_ARG, 2);
		else {
			/* One access through the fault-tolerant path first: the timed loop cannot
			 * recover from an abort. */
			checked_load(pc, a0, a1, err);
			if (!*err)
				v = agent_timed_read(a0, a1, a2);
		}
		break;
	case OP_PING:
		v = mb_read(MB_ARG0);
		break;
	default:
		*err = error(ERR_UNKNOWN_OP, op);
		break;
	}
	return v;
}

/* Sleep until an interrupt, a host kick, or at most idle_ticks. Entered with IRQs masked, so an
 * interrupt that became pending after the REQ poll still ends the WFI (WFI wakes on a pending
 * interrupt whatever PSTATE.I says); it is taken when IRQs are unmasked below. */
static void idle(struct percpu *pc)
{
	if (pc->idle_ticks) {
		isb();
		write_sysreg("cntv_cval_el0", read_sysreg("cntvct_el0") + pc->idle_ticks);
		write_sysreg("cntv_ctl_el0", CNTV_CTL_ENABLE);
		isb();
	}
	wfi();
	write_sysreg("cntv_ctl_el0", 0);
	isb();
	if (pc->mode != IRQ_MODE_MASKED)
		irq_unmask();
}

void agent_main(u64 index, u64 secondary) __attribute__((noreturn));

void agent_main(u64 index, u64 secondary)
{
	struct percpu *pc = &percpu[index];
	u64 gicd, idle_us;

	write_sysreg("tpidr_el1", pc);
	pc->index = index;
	pc->mpidr = read_sysreg("mpidr_el1");
	pc->mode = IRQ_MODE_REPORT;

	mb_write(MB_VERSION, AGENT_VERSION);
	gicd = mb_read(MB_GICD_BASE);
	pc->gicr = mb_read(MB_GICR_BASE);
	idle_us = mb_read(MB_IDLE_US);
	if (idle_us > 10000000)
		idle_us = 10000000;
	pc->idle_ticks = read_sysreg("cntfrq_el0") * idle_us / 1000000;

	cpu_interface_init();
	if (!secondary && gicd)
		distributor_init(gicd);
	if (pc->gicr)
		redistributor_init(pc->gicr);

	mb_write(MB_HELLO, pc->mpidr);  /* ready: requests are served from now on */

	for (;;) {
		u64 op, v, err;

		irq_mask();
		op = mb_read(MB_REQ);
		if (op == OP_WAIT) {
			idle(pc);
			continue;
		}
		if (pc->mode != IRQ_MODE_MASKED)
			irq_unmask();
		err = 0;
		v = serve(pc, op, &err);
		if (err)
			mb_write(MB_ERROR, err);
		else
			mb_write(MB_RESULT, v);
	}
}
