/*
 * exit_floor: the C floor of the MMIO exit loop that `kvmits bench` compares Python with.
 *
 * One VM, one vCPU, a few bytes of guest code looping on "load from MMIO, add 1, store to
 * MMIO" at an address with no memory slot behind it, so every access is a KVM_EXIT_MMIO.
 * The loop here does what the least VMM must: KVM_RUN, look at the exit, answer a read.
 *
 *   x86_64 : a real-mode guest (the same bytes as tests/x86guest.py LOOP)
 *   aarch64: an EL1 guest with the MMU off (hand-encoded A64, see below)
 *
 * Usage: exit_floor EXITS REPEAT
 * Prints one JSON object: {"arch": ..., "exits": N, "seconds": [t1, t2, ...]}
 * (each t: wall time of EXITS exits after a warm-up). Exit status 2 when KVM is unusable.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "exit_floor: %s: %s\n", what, strerror(errno));
	exit(2);
}

#if defined(__x86_64__)
#define ARCH "x86_64"
#define RAM_GPA 0x0
#define RAM_SIZE 0x8000
#define CODE 0x1000
/* loop: mov ax,[0x9002] ; add ax,1 ; mov [0x9004],ax ; jmp loop   (tests/x86guest.py LOOP) */
static const uint8_t guest[] = { 0xa1, 0x02, 0x90, 0x05, 0x01, 0x00, 0xa3, 0x04, 0x90, 0xeb, 0xf5 };

static void setup_vcpu(int vm, int vcpu)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	(void)vm;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = sregs.ds.base = sregs.es.base = sregs.ss.base = 0;
	sregs.cs.selector = sregs.ds.selector = sregs.es.selector = sregs.ss.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}
#elif defined(__aarch64__)
#define ARCH "aarch64"
#define RAM_GPA 0x40000000
#define RAM_SIZE 0x10000
#define CODE RAM_GPA
/* Hand-encoded A64 (Arm ARM C6), MMIO at 0x10000000, which has no memory slot:
 *       movz x1, #0x1000, lsl #16     d2a20001
 * loop: ldr  w0, [x1]                 b9400020
 *       add  w0, w0, #1               11000400
 *       str  w0, [x1, #4]             b9000420
 *       b    loop                     17fffffd
 * Same as kvmits.bench.exitloop.A64_LOOP. */
static const uint32_t guest[] = { 0xd2a20001, 0xb9400020, 0x11000400, 0xb9000420, 0x17fffffd };

static void setup_vcpu(int vm, int vcpu)
{
	struct kvm_vcpu_init init;
	struct kvm_one_reg reg;
	uint64_t pc = CODE;
	if (ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init) < 0)
		die("KVM_ARM_PREFERRED_TARGET");
	if (ioctl(vcpu, KVM_ARM_VCPU_INIT, &init) < 0)
		die("KVM_ARM_VCPU_INIT");
	reg.id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
		 (offsetof(struct kvm_regs, regs.pc) / sizeof(uint32_t));
	reg.addr = (uint64_t)(uintptr_t)&pc;
	if (ioctl(vcpu, KVM_SET_ONE_REG, &reg) < 0)
		die("KVM_SET_ONE_REG(pc)");
}
#else
#error "exit_floor: x86_64 or aarch64 only"
#endif

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The floor: KVM_RUN, check the exit, answer reads with the last value written. */
static void loop(int vcpu, struct kvm_run *run, long exits)
{
	uint64_t value = 0;
	for (long i = 0; i < exits; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_MMIO) {
			fprintf(stderr, "exit_floor: unexpected exit reason %u\n", run->exit_reason);
			exit(1);
		}
		if (run->mmio.is_write)
			memcpy(&value, run->mmio.data, run->mmio.len);
		else
			memcpy(run->mmio.data, &value, run->mmio.len);
	}
}

int main(int argc, char **argv)
{
	long exits = argc > 1 ? atol(argv[1]) : 200000;
	int repeat = argc > 2 ? atoi(argv[2]) : 5;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	void *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap RAM");
	memcpy((char *)ram + (CODE - RAM_GPA), guest, sizeof(guest));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = RAM_GPA, .memory_size = RAM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)ram,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	setup_vcpu(vm, vcpu);
	loop(vcpu, run, exits / 10 + 1000);	/* warm up */
	printf("{\"arch\": \"%s\", \"exits\": %ld, \"seconds\": [", ARCH, exits);
	for (int r = 0; r < repeat; r++) {
		double t0 = now();
		loop(vcpu, run, exits);
		printf("%s%.9f", r ? ", " : "", now() - t0);
	}
	printf("]}\n");
	return 0;
}
