/*
 * A fault queue as a VMM drives it (run under the interposer by
 * tests/preload.rs): a nested HWPT that reports to a fault queue, a page
 * request from the mock device, poll() saying when to read, the record
 * read, the response written. Linux's fault file is always writable and
 * readable while groups wait.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common.h"

struct hwpt_alloc {
	uint32_t size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len;
	uint64_t data_uptr;
	uint32_t fault_id, reserved2;
};
struct pgfault { uint32_t flags, dev_id, pasid, grpid, perm, reserved; uint64_t addr; uint32_t length, cookie; };
struct response { uint32_t cookie, code; };

static short revents(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
	return poll(&p, 1, 0) < 0 ? -1 : p.revents;
}

int main(void)
{
	uint8_t c[TEST_CMD_SIZE];
	int fd = open("/dev/iommu", O_RDWR);
	struct ioas_alloc a = { .size = sizeof(a) };
	CHECK(fd >= 0 && ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0, "context and IOAS");
	test_cmd(c, 2, a.out_ioas_id);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "mock domain");
	uint32_t stdev = get32(c, 16), idev = get32(c, 24);

	struct hwpt_alloc parent = { .size = sizeof(parent), .flags = 1 /* NEST_PARENT */, .dev_id = idev,
				     .pt_id = a.out_ioas_id };
	CHECK(ioctl(fd, IOMMU_HWPT_ALLOC, &parent) == 0, "a nesting parent");
	struct fault_alloc fa = { .size = sizeof(fa) };
	CHECK(ioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &fa) == 0, "a fault queue");
	int q = (int)fa.out_fault_fd;
	{
		/* An anonymous file, never positioned: pread and pwrite are ESPIPE
		 * (a negative offset is EINVAL before that), as on Linux. */
		uint8_t rec[40] = { 0 };
		CHECK(pread(q, rec, sizeof(rec), 0) == -1 && errno == ESPIPE, "pread on the fault queue: ESPIPE");
		CHECK(pwrite(q, rec, 8, 0) == -1 && errno == ESPIPE, "pwrite on the fault queue: ESPIPE");
		CHECK(pread(q, rec, sizeof(rec), -8) == -1 && errno == EINVAL, "pread at a negative offset: EINVAL");
	}
	uint32_t iotlb = 0;
	struct hwpt_alloc nested = { .size = sizeof(nested), .flags = 1 << 2 /* FAULT_ID_VALID */, .dev_id = idev,
				     .pt_id = parent.out_hwpt_id, .data_type = 0xdead /* selftest */,
				     .data_len = sizeof(iotlb), .data_uptr = (uintptr_t)&iotlb,
				     .fault_id = fa.out_fault_id };
	CHECK(ioctl(fd, IOMMU_HWPT_ALLOC, &nested) == 0, "a nested HWPT reporting to the queue");
	test_cmd(c, 10, stdev); /* MOCK_DOMAIN_REPLACE */
	put32(c, 16, nested.out_hwpt_id);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "the device on it");

	CHECK(revents(q) == POLLOUT, "an empty queue polls writable, not readable");
	test_cmd(c, 15, 0); /* TRIGGER_IOPF */
	put32(c, 16, idev);
	put32(c, 20, 1);
	put32(c, 24, 2);
	put32(c, 28, 3);
	put64(c, 32, 0xdeadbeef000);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "the device asks for a page");
	CHECK(revents(q) == (POLLIN | POLLOUT), "now it polls readable");
	struct pgfault f;
	CHECK(read(q, &f, sizeof(f)) == sizeof(f) && f.grpid == 2 && f.addr == 0xdeadbeef000, "read the record");
	CHECK(revents(q) == POLLOUT, "read: not readable any more");
	struct response r = { .cookie = f.cookie, .code = 0 };
	CHECK(write(q, &r, sizeof(r)) == sizeof(r), "answer it");
	CHECK(revents(q) == POLLOUT, "still writable");
	CHECK(close(q) == 0, "close the queue");
	printf("done\n");
	return 0;
}
