/*
 * kvmits.h: the part of the Linux KVM UAPI that kvmits uses, written for cffi's cdef
 * (ABI mode: no compiler at run time). It is NOT included by C code: there are no
 * #include lines, include guards or macros with arguments, because cdef cannot take them.
 *
 * Every name is the kernel's own (include/uapi/linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h,
 * arch/x86/include/uapi/asm/kvm.h), and tests/test_uapi_layout.py compiles the real kernel
 * headers to check every struct size, member offset and constant below, for x86_64 and arm64.
 *
 * The file is split into sections by "@section NAME" comments: "generic" (every architecture),
 * "arm64" and "x86". The layout test checks a section only against the headers of its
 * architecture(s). Struct layouts below use fixed-width types only, so they are the same on
 * every 64-bit little-endian architecture.
 */

/* @section generic */

int ioctl(int fd, unsigned long request, ...);

#define KVMIO 0xAE
#define KVM_API_VERSION 12

/* KVM_CHECK_EXTENSION capabilities */
#define KVM_CAP_IRQCHIP 0
#define KVM_CAP_USER_MEMORY 3
#define KVM_CAP_NR_VCPUS 9
#define KVM_CAP_NR_MEMSLOTS 10
#define KVM_CAP_IRQ_ROUTING 25
#define KVM_CAP_READONLY_MEM 81
#define KVM_CAP_IRQFD 32
#define KVM_CAP_IOEVENTFD 36
#define KVM_CAP_MAX_VCPUS 66
#define KVM_CAP_ONE_REG 70
#define KVM_CAP_SIGNAL_MSI 77
#define KVM_CAP_IRQFD_RESAMPLE 82
#define KVM_CAP_DEVICE_CTRL 89
#define KVM_CAP_MAX_VCPU_ID 128
#define KVM_CAP_MSI_DEVID 131
#define KVM_CAP_IMMEDIATE_EXIT 136

/* kvm_run.exit_reason */
#define KVM_EXIT_UNKNOWN 0
#define KVM_EXIT_EXCEPTION 1
#define KVM_EXIT_IO 2
#define KVM_EXIT_HYPERCALL 3
#define KVM_EXIT_DEBUG 4
#define KVM_EXIT_HLT 5
#define KVM_EXIT_MMIO 6
#define KVM_EXIT_IRQ_WINDOW_OPEN 7
#define KVM_EXIT_SHUTDOWN 8
#define KVM_EXIT_FAIL_ENTRY 9
#define KVM_EXIT_INTR 10
#define KVM_EXIT_INTERNAL_ERROR 17
#define KVM_EXIT_SYSTEM_EVENT 24
#define KVM_EXIT_ARM_NISV 28

#define KVM_EXIT_IO_IN 0
#define KVM_EXIT_IO_OUT 1

/* kvm_run.system_event.type */
#define KVM_SYSTEM_EVENT_SHUTDOWN 1
#define KVM_SYSTEM_EVENT_RESET 2
#define KVM_SYSTEM_EVENT_CRASH 3
#define KVM_SYSTEM_EVENT_WAKEUP 4
#define KVM_SYSTEM_EVENT_SUSPEND 5

/* KVM_GET/SET_ONE_REG ids: the register's size in bytes is 1 << ((id & KVM_REG_SIZE_MASK) >>
 * KVM_REG_SIZE_SHIFT) (api.rst, 4.68 KVM_SET_ONE_REG) */
#define KVM_REG_SIZE_SHIFT 52
#define KVM_REG_SIZE_MASK 0x00f0000000000000

/* kvm_mp_state.mp_state (api.rst, 4.38 KVM_GET_MP_STATE): arm64 uses RUNNABLE, STOPPED
 * (powered off by PSCI or KVM_ARM_VCPU_POWER_OFF) and SUSPENDED */
#define KVM_MP_STATE_RUNNABLE 0
#define KVM_MP_STATE_STOPPED 5
#define KVM_MP_STATE_SUSPENDED 10

/* kvm_userspace_memory_region.flags */
#define KVM_MEM_LOG_DIRTY_PAGES 1
#define KVM_MEM_READONLY 2

/* GSI routing, irqfd, MSI */
#define KVM_IRQ_ROUTING_IRQCHIP 1
#define KVM_IRQ_ROUTING_MSI 2
#define KVM_MSI_VALID_DEVID 1
#define KVM_IRQFD_FLAG_DEASSIGN 1
#define KVM_IRQFD_FLAG_RESAMPLE 2

/* KVM_IOEVENTFD flags: 1 << kvm_ioeventfd_flag_nr_{datamatch,pio,deassign} */
#define KVM_IOEVENTFD_FLAG_DATAMATCH 1
#define KVM_IOEVENTFD_FLAG_PIO 2
#define KVM_IOEVENTFD_FLAG_DEASSIGN 4

/* KVM_CREATE_DEVICE */
#define KVM_CREATE_DEVICE_TEST 1
#define KVM_DEV_TYPE_ARM_VGIC_V2 5
#define KVM_DEV_TYPE_ARM_VGIC_V3 7
#define KVM_DEV_TYPE_ARM_VGIC_ITS 8

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t status;
    };
    uint32_t level;
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    union {
        uint32_t pad;
        uint32_t devid;
    };
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t pad[12];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

/* KVM_GET_REG_LIST: n in, the count out (E2BIG and the count when n is too small) */
struct kvm_reg_list {
    uint64_t n;
    uint64_t reg[];
};

struct kvm_one_reg {
    uint64_t id;
    uint64_t addr;
};

struct kvm_create_device {
    uint32_t type;
    uint32_t fd;
    uint32_t flags;
};

struct kvm_device_attr {
    uint32_t flags;
    uint32_t group;
    uint64_t attr;
    uint64_t addr;
};

/*
 * The shared kvm_run page, as far as kvmits reads it. The exit union is padded to 256
 * bytes by the kernel ("char padding[256]"), and the sync-regs area to 2048, so the
 * offsets here hold on every architecture.
 */
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};

/* @section arm64 */

/* KVM_ARM_VCPU_INIT features (bit numbers in features[0]) */
#define KVM_ARM_VCPU_POWER_OFF 0
#define KVM_ARM_VCPU_EL1_32BIT 1
#define KVM_ARM_VCPU_PSCI_0_2 2
#define KVM_ARM_VCPU_PMU_V3 3

/* arm64 capabilities */
#define KVM_CAP_ARM_PSCI 87
#define KVM_CAP_ARM_PSCI_0_2 102
#define KVM_CAP_ARM_PMU_V3 126
#define KVM_CAP_ARM_VM_IPA_SIZE 165
#define KVM_CAP_ARM_IRQ_LINE_LAYOUT_2 174
#define KVM_CAP_ARM_NISV_TO_USER 177
#define KVM_CAP_ARM_INJECT_EXT_DABT 178

/* KVM_IRQ_LINE irq field: Documentation/virt/kvm/api.rst, 4.25 KVM_IRQ_LINE */
#define KVM_ARM_IRQ_VCPU2_SHIFT 28
#define KVM_ARM_IRQ_VCPU2_MASK 0xf
#define KVM_ARM_IRQ_TYPE_SHIFT 24
#define KVM_ARM_IRQ_TYPE_MASK 0xf
#define KVM_ARM_IRQ_VCPU_SHIFT 16
#define KVM_ARM_IRQ_VCPU_MASK 0xff
#define KVM_ARM_IRQ_NUM_SHIFT 0
#define KVM_ARM_IRQ_NUM_MASK 0xffff
#define KVM_ARM_IRQ_TYPE_CPU 0
#define KVM_ARM_IRQ_TYPE_SPI 1
#define KVM_ARM_IRQ_TYPE_PPI 2

/* vGIC device attributes: Documentation/virt/kvm/devices/arm-vgic-v3.rst, arm-vgic-its.rst */
#define KVM_DEV_ARM_VGIC_GRP_ADDR 0
#define KVM_DEV_ARM_VGIC_GRP_DIST_REGS 1
#define KVM_DEV_ARM_VGIC_GRP_CPU_REGS 2
#define KVM_DEV_ARM_VGIC_GRP_NR_IRQS 3
#define KVM_DEV_ARM_VGIC_GRP_CTRL 4
#define KVM_DEV_ARM_VGIC_GRP_REDIST_REGS 5
#define KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS 6
#define KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO 7
#define KVM_DEV_ARM_VGIC_GRP_ITS_REGS 8
#define KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT 32
#define KVM_DEV_ARM_VGIC_CTRL_INIT 0
#define KVM_DEV_ARM_ITS_SAVE_TABLES 1
#define KVM_DEV_ARM_ITS_RESTORE_TABLES 2
#define KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES 3
#define KVM_DEV_ARM_ITS_CTRL_RESET 4
/* GRP_LEVEL_INFO attributes: mpidr in 63:32, info in 31:10 (VGIC_LEVEL_INFO_LINE_LEVEL), the
 * first of 32 vINTIDs in 9:0 (arm-vgic-v3.rst, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO) */
#define KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT 10
#define KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK 0x3ff
#define VGIC_LEVEL_INFO_LINE_LEVEL 0
#define KVM_VGIC_V3_ADDR_TYPE_DIST 2
#define KVM_VGIC_V3_ADDR_TYPE_REDIST 3
#define KVM_VGIC_ITS_ADDR_TYPE 4
#define KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION 5

/* KVM_GET/SET_ONE_REG ids of the core registers: KVM_REG_ARM64 | KVM_REG_SIZE_U64 |
 * KVM_REG_ARM_CORE | (offset of the field in struct kvm_regs / 4); built in uapi.arm64_core_reg */
#define KVM_REG_ARM64 0x6000000000000000
#define KVM_REG_SIZE_U64 0x0030000000000000
#define KVM_REG_ARM_CORE 0x00100000
/* ... and of the system registers: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG |
 * op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2 */
#define KVM_REG_ARM64_SYSREG 0x00130000
#define KVM_REG_ARM64_SYSREG_OP0_SHIFT 14
#define KVM_REG_ARM64_SYSREG_OP1_SHIFT 11
#define KVM_REG_ARM64_SYSREG_CRN_SHIFT 7
#define KVM_REG_ARM64_SYSREG_CRM_SHIFT 3

struct kvm_vcpu_init {
    uint32_t target;
    uint32_t features[7];
};

/* @section x86 */

/* The x86 registers the host smoke guest sets (real mode at a chosen CS:IP). */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};
