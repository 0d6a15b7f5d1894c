/* Freestanding arm64 helpers for the guest programs: types, system registers, MMIO. */
#ifndef KVMITS_ARM64_H
#define KVMITS_ARM64_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long uintptr_t;
typedef unsigned long size_t;

/* GICv3 CPU interface system registers by encoding (Arm IHI 0069, 12.2), so any assembler
 * takes them whatever -march says. */
#define ICC_PMR_EL1     "S3_0_C4_C6_0"
#define ICC_AP1R0_EL1   "S3_0_C12_C9_0"
#define ICC_DIR_EL1     "S3_0_C12_C11_1"
#define ICC_RPR_EL1     "S3_0_C12_C11_3"
#define ICC_SGI1R_EL1   "S3_0_C12_C11_5"
#define ICC_IAR1_EL1    "S3_0_C12_C12_0"
#define ICC_EOIR1_EL1   "S3_0_C12_C12_1"
#define ICC_HPPIR1_EL1  "S3_0_C12_C12_2"
#define ICC_BPR1_EL1    "S3_0_C12_C12_3"
#define ICC_CTLR_EL1    "S3_0_C12_C12_4"
#define ICC_SRE_EL1     "S3_0_C12_C12_5"
#define ICC_IGRPEN1_EL1 "S3_0_C12_C12_7"

#define read_sysreg(reg) ({ u64 __v; __asm__ volatile("mrs %0, " reg : "=r"(__v)); __v; })
#define write_sysreg(reg, v) __asm__ volatile("msr " reg ", %0" : : "r"((u64)(v)) : "memory")

#define isb()       __asm__ volatile("isb" : : : "memory")
#define dsb_sy()    __asm__ volatile("dsb sy" : : : "memory")
#define wfi()       __asm__ volatile("wfi" : : : "memory")
#define irq_mask()  __asm__ volatile("msr daifset, #2" : : : "memory")
#define irq_unmask() __asm__ volatile("msr daifclr, #2" : : : "memory")

/* MMIO: one plain load or store with a base register and no offset, so the data abort that
 * KVM takes carries a valid instruction syndrome (ESR_ELx.ISV) and KVM can emulate it or hand
 * it to the VMM. Never let the compiler merge, pair or split these. */
static inline u32 mmio_read32(u64 addr)
{
	u32 v;
	__asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline u64 mmio_read64(u64 addr)
{
	u64 v;
	__asm__ volatile("ldr %0, [%1]" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_write32(u64 addr, u32 v)
{
	__asm__ volatile("str %w0, [%1]" : : "rZ"(v), "r"(addr) : "memory");
}

static inline void mmio_write64(u64 addr, u64 v)
{
	__asm__ volatile("str %x0, [%1]" : : "rZ"(v), "r"(addr) : "memory");
}

#endif
