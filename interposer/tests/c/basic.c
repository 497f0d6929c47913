/*
 * A plain iommufd program, run under the interposer by tests/preload.rs.
 * It declares the few uAPI structs it uses itself (the layouts of Linux's
 * include/uapi/linux/iommufd.h and the selftest's iommufd_test.h), so it
 * builds without kernel headers. Prints "ok - <what>" per check and exits
 * non-zero at the first failure, saying which.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define MAP_FLAG_WRITEABLE 2
#define MAP_FLAG_READABLE 4

#define OP_MOCK_DOMAIN 2
#define OP_MD_CHECK_MAP 3
#define OP_MD_CHECK_REFS 4
#define OP_CREATE_ACCESS 5
#define OP_ACCESS_RW 8
#define ACCESS_RW_WRITE 1

#define PAGE 4096UL
#define NPAGES 16UL
#define LEN (NPAGES * PAGE)

struct allow_iovas { uint32_t size, ioas_id, num_iovas, reserved; uint64_t allowed_iovas; };
struct destroy { uint32_t size, id; };

/* Whether the process has capability `bit` (CapEff of /proc/self/status). */
static int has_cap(int bit)
{
	char line[256];
	unsigned long long eff = 0;
	FILE *f = fopen("/proc/self/status", "r");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "CapEff: %llx", &eff) == 1)
			break;
	fclose(f);
	return (eff >> bit) & 1;
}

static int access_rw(int fd, uint32_t access, uint64_t iova, void *buf, uint64_t len, int write)
{
	uint8_t c[TEST_CMD_SIZE];
	test_cmd(c, OP_ACCESS_RW, access);
	put64(c, 16, iova);
	put64(c, 24, len);
	put64(c, 32, (uintptr_t)buf);
	put32(c, 40, write ? ACCESS_RW_WRITE : 0);
	return ioctl(fd, IOMMU_TEST_CMD, c);
}

int main(void)
{
	struct stat st;
	int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	CHECK(fd >= 0, "open /dev/iommu");
	{
		/* Linux's /dev/iommu has no read or write (EINVAL) but is a
		 * positioned character device; a negative offset is EINVAL first. */
		char byte = 0;
		CHECK(read(fd, &byte, 1) == -1 && errno == EINVAL, "read on the context: EINVAL");
		CHECK(pread(fd, &byte, 1, 0) == -1 && errno == EINVAL, "pread on the context: EINVAL");
		CHECK(pwrite(fd, &byte, 1, 8) == -1 && errno == EINVAL, "pwrite on the context: EINVAL");
		CHECK(pread(fd, &byte, 1, -1) == -1 && errno == EINVAL, "pread at a negative offset: EINVAL");

		/* Opened write-only or read-only: the mode is the descriptor's
		 * (F_GETFL), reading a write-only one is EBADF before EINVAL and
		 * writing a read-only one likewise, and ioctls work either way. */
		int wo = open("/dev/iommu", O_WRONLY | O_CLOEXEC), ro = open("/dev/iommu", O_RDONLY);
		CHECK(wo >= 0 && ro >= 0, "open /dev/iommu write-only and read-only");
		CHECK((fcntl(wo, F_GETFL) & O_ACCMODE) == O_WRONLY, "F_GETFL says write-only");
		CHECK((fcntl(ro, F_GETFL) & O_ACCMODE) == O_RDONLY, "F_GETFL says read-only");
		CHECK((fcntl(wo, F_GETFD) & FD_CLOEXEC) && !(fcntl(ro, F_GETFD) & FD_CLOEXEC), "close-on-exec as asked");
		CHECK(read(wo, &byte, 1) == -1 && errno == EBADF, "read on a write-only context: EBADF");
		CHECK(pread(wo, &byte, 1, 0) == -1 && errno == EBADF, "pread on a write-only context: EBADF");
		CHECK(pread(wo, &byte, 1, -1) == -1 && errno == EINVAL, "negative offset still EINVAL first");
		CHECK(write(wo, &byte, 1) == -1 && errno == EINVAL, "write on a write-only context: EINVAL");
		CHECK(write(ro, &byte, 1) == -1 && errno == EBADF, "write on a read-only context: EBADF");
		CHECK(read(ro, &byte, 1) == -1 && errno == EINVAL, "read on a read-only context: EINVAL");
		int dup_wo = dup(wo);
		CHECK(read(dup_wo, &byte, 1) == -1 && errno == EBADF, "a duplicate keeps the mode");
		struct { uint32_t size, flags, out_ioas_id; } a = { sizeof(a), 0, 0 };
		CHECK(ioctl(wo, IOMMU_IOAS_ALLOC, &a) == 0 && ioctl(ro, IOMMU_IOAS_ALLOC, &a) == 0, "ioctls in either mode");
		close(dup_wo);
		close(wo);
		close(ro);
	}

	/* RLIMIT_MODE: setting it needs CAP_SYS_RESOURCE (EPERM without). */
	struct option opt = { .size = sizeof(opt), .option_id = 0, .op = 0, .val64 = 1 };
	errno = 0;
	if (has_cap(24)) {
		CHECK(ioctl(fd, IOMMU_OPTION, &opt) == 0, "RLIMIT_MODE set with CAP_SYS_RESOURCE");
		opt.val64 = 0;
		CHECK(ioctl(fd, IOMMU_OPTION, &opt) == 0, "RLIMIT_MODE set back");
	} else {
		CHECK(ioctl(fd, IOMMU_OPTION, &opt) == -1 && errno == EPERM, "RLIMIT_MODE set without CAP_SYS_RESOURCE: EPERM");
	}
	opt.op = 1;
	CHECK(ioctl(fd, IOMMU_OPTION, &opt) == 0 && opt.val64 == 0, "RLIMIT_MODE get");
	CHECK(fstat(fd, &st) == 0, "the descriptor is a real one");
	CHECK(fcntl(fd, F_GETFD) == FD_CLOEXEC, "O_CLOEXEC is honoured");

	struct ioas_alloc a = { .size = sizeof(a) };
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0 && a.out_ioas_id != 0, "IOAS_ALLOC");
	uint32_t ioas = a.out_ioas_id;

	uint8_t c[TEST_CMD_SIZE];
	test_cmd(c, OP_MOCK_DOMAIN, ioas);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MOCK_DOMAIN");
	uint32_t stdev = get32(c, 16), hwpt = get32(c, 20);
	CHECK(stdev != 0 && hwpt != 0 && get32(c, 24) != 0, "MOCK_DOMAIN answers its ids");

	uint8_t *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(buf != MAP_FAILED, "mmap an anonymous buffer");
	for (unsigned long i = 0; i < LEN; i++)
		buf[i] = (uint8_t)(i * 7 + 3);

	struct ioas_map m = { .size = sizeof(m), .flags = MAP_FLAG_READABLE | MAP_FLAG_WRITEABLE,
			      .ioas_id = ioas, .user_va = (uintptr_t)buf, .length = LEN };
	CHECK(ioctl(fd, IOMMU_IOAS_MAP, &m) == 0, "IOAS_MAP");
	CHECK(m.iova != 0, "IOAS_MAP answers an IOVA");
	for (unsigned long i = 0; i < LEN; i++)
		if (buf[i] != (uint8_t)(i * 7 + 3)) {
			printf("FAIL - contents changed by the pin at %lu\n", i);
			return 1;
		}
	printf("ok - the buffer reads the same after pinning\n");

	test_cmd(c, OP_MD_CHECK_MAP, hwpt);
	put64(c, 16, m.iova);
	put64(c, 24, LEN);
	put64(c, 32, (uintptr_t)buf);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MD_CHECK_MAP: the domain maps the buffer's pages");

	test_cmd(c, OP_MD_CHECK_REFS, 0);
	put64(c, 16, LEN);
	put64(c, 24, (uintptr_t)buf);
	put32(c, 32, 1);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MD_CHECK_REFS: each page pinned once");

	test_cmd(c, OP_CREATE_ACCESS, ioas);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "CREATE_ACCESS");
	int access = (int)get32(c, 16);
	CHECK(fcntl(access, F_GETFD) >= 0, "the access descriptor is a real one");

	/* The process writes, the access reads it through the IOAS. */
	uint8_t small[64];
	buf[PAGE + 5] = 0xa5;
	CHECK(access_rw(fd, access, m.iova + PAGE + 5, small, 1, 0) == 0 && small[0] == 0xa5,
	      "ACCESS_RW sees the process's store");
	/* The access writes, the process sees it. */
	small[0] = 0x5a;
	CHECK(access_rw(fd, access, m.iova + 2 * PAGE, small, 1, 1) == 0 && buf[2 * PAGE] == 0x5a,
	      "the process sees an ACCESS_RW write");

	/* Linux's pin: the IOAS keeps the pages after the process unmaps them. */
	CHECK(munmap(buf, LEN) == 0, "munmap the pinned buffer");
	CHECK(access_rw(fd, access, m.iova + 3 * PAGE + 9, small, 1, 0) == 0 &&
		      small[0] == (uint8_t)((3 * PAGE + 9) * 7 + 3),
	      "the IOAS still reads the unmapped pages");
	void *again = mmap(buf, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	CHECK(again == buf, "map fresh zero pages at the same address");
	CHECK(access_rw(fd, access, m.iova + PAGE + 5, small, 1, 0) == 0 && small[0] == 0xa5 &&
		      buf[PAGE + 5] == 0,
	      "IOAS and process now see different pages");

	CHECK(close(access) == 0, "close the access");

	struct ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = m.iova, .length = LEN };
	CHECK(ioctl(fd, IOMMU_IOAS_UNMAP, &u) == 0 && u.length == LEN, "IOAS_UNMAP");

	/* Wild pointers: EFAULT, never a crash. */
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, (void *)8) == -1 && errno == EFAULT, "command at a wild pointer: EFAULT");
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, (void *)0xfffffffffffff000UL) == -1 && errno == EFAULT,
	      "command in the last page of the address space: EFAULT");
	struct ioas_map wild = { .size = sizeof(wild), .flags = MAP_FLAG_READABLE, .ioas_id = ioas,
				 .user_va = 0x10000, .length = PAGE };
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_MAP, &wild) == -1 && errno == EFAULT, "IOAS_MAP of unmapped memory: EFAULT");
	wild.user_va = 0xffffffffffffe000UL;
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_MAP, &wild) == -1 && errno == EFAULT, "IOAS_MAP of kernel addresses: EFAULT");
	struct allow_iovas al = { .size = sizeof(al), .num_iovas = 2, .allowed_iovas = 0x20, .ioas_id = ioas };
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOW_IOVAS, &al) == -1 && errno == EFAULT, "range array at a wild pointer: EFAULT");
	CHECK(access_rw(fd, 12345, 0, small, 1, 0) == -1, "ACCESS_RW on a descriptor that is no access fails");

	/* Linux's size rules. */
	struct { struct ioas_alloc a; uint32_t tail[3]; } big = { .a = { .size = sizeof(big) } };
	big.tail[2] = 1;
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &big) == -1 && errno == E2BIG, "non-zero tail: E2BIG");
	big.tail[2] = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &big) == 0 && big.a.out_ioas_id != 0, "zero tail: accepted");
	struct ioas_alloc tiny = { .size = 8 };
	errno = 0;
	CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &tiny) == -1 && errno == EINVAL, "size below the minimum: EINVAL");
	errno = 0;
	CHECK(ioctl(fd, IOCTL_NR(0x7f), &tiny) == -1 && errno == ENOTTY, "unknown command: ENOTTY");

	/* Fault queue descriptors are real too. */
	struct fault_alloc fa = { .size = sizeof(fa) };
	CHECK(ioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &fa) == 0, "FAULT_QUEUE_ALLOC");
	CHECK(fcntl((int)fa.out_fault_fd, F_GETFD) == FD_CLOEXEC, "the fault descriptor is real and close-on-exec");
	struct destroy d = { .size = sizeof(d), .id = fa.out_fault_id };
	errno = 0;
	CHECK(ioctl(fd, IOMMU_DESTROY, &d) == -1 && errno == EBUSY, "an open fault queue is busy");
	CHECK(close((int)fa.out_fault_fd) == 0, "close the fault descriptor");
	CHECK(ioctl(fd, IOMMU_DESTROY, &d) == 0, "then it can be destroyed");

	/* Duplicates name the same context. */
	int d1 = dup(fd);
	int d2 = fcntl(fd, F_DUPFD_CLOEXEC, 100);
	CHECK(d1 >= 0 && d2 >= 100, "dup and F_DUPFD_CLOEXEC");
	CHECK(close(fd) == 0, "close the original");
	d.id = ioas;
	errno = 0;
	CHECK(ioctl(d1, IOMMU_DESTROY, &d) == -1 && errno == EBUSY, "the context lives on in the duplicate");
	CHECK(dup2(d1, 50) == 50 && close(d1) == 0, "dup2");
	test_cmd(c, OP_MD_CHECK_REFS, 0);
	put64(c, 16, PAGE);
	put64(c, 24, (uintptr_t)buf);
	put32(c, 32, 0);
	CHECK(ioctl(50, IOMMU_TEST_CMD, c) == 0, "through dup2's descriptor");
	CHECK(close(50) == 0 && close(d2) == 0, "close every duplicate");
	errno = 0;
	CHECK(ioctl(d2, IOMMU_IOAS_ALLOC, &a) == -1 && errno == EBADF, "a closed descriptor: EBADF");

	/* close_range closes Portcullis descriptors too: their pins go. */
	{
		int f2 = open("/dev/iommu", O_RDWR);
		struct ioas_alloc a2 = { .size = sizeof(a2) };
		CHECK(f2 >= 0 && ioctl(f2, IOMMU_IOAS_ALLOC, &a2) == 0, "a second context");
		test_cmd(c, OP_MOCK_DOMAIN, a2.out_ioas_id);
		CHECK(ioctl(f2, IOMMU_TEST_CMD, c) == 0, "with a mock domain");
		struct ioas_map m2 = { .size = sizeof(m2), .flags = MAP_FLAG_READABLE, .ioas_id = a2.out_ioas_id,
				       .user_va = (uintptr_t)buf, .length = PAGE };
		CHECK(ioctl(f2, IOMMU_IOAS_MAP, &m2) == 0, "pinning a page");
		test_cmd(c, OP_MD_CHECK_REFS, 0);
		put64(c, 16, PAGE);
		put64(c, 24, (uintptr_t)buf);
		put32(c, 32, 1);
		CHECK(ioctl(f2, IOMMU_TEST_CMD, c) == 0, "pinned once");
		CHECK(close_range(f2, f2, 0) == 0, "close_range over it");
		int f3 = open("/dev/iommu", O_RDWR);
		put32(c, 32, 0);
		CHECK(f3 >= 0 && ioctl(f3, IOMMU_TEST_CMD, c) == 0, "the page is unpinned: the context closed");
		close(f3);
	}

	/* Other descriptors pass through. */
	int null = open("/dev/null", O_RDWR);
	CHECK(null >= 0 && write(null, "x", 1) == 1, "other files work as before");
	errno = 0;
	CHECK(ioctl(null, IOMMU_IOAS_ALLOC, &a) == -1 && errno == ENOTTY, "ioctl on another file reaches the kernel");
	close(null);
	printf("done\n");
	return 0;
}
