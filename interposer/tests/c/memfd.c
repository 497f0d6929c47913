/*
 * Guest RAM as QEMU and cloud-hypervisor keep it: a memfd, mmap'd shared
 * (run under the interposer by tests/preload.rs). IOAS_MAP of the mapping
 * pins the file's pages, the same pages IOAS_MAP_FILE pins; what the
 * process writes through the mapping the IOAS reads, and the pages stay
 * after munmap and close, as the file does.
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
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define LEN (8 * PAGE)

struct ioas_map_file { uint32_t size, flags, ioas_id; int32_t fd; uint64_t start, length, iova; };

static int fd;
static uint32_t access_id;

static uint8_t dma_read(uint64_t iova)
{
	uint8_t c[TEST_CMD_SIZE], got = 0;
	test_cmd(c, 8, access_id);
	put64(c, 16, iova);
	put64(c, 24, 1);
	put64(c, 32, (uintptr_t)&got);
	if (ioctl(fd, IOMMU_TEST_CMD, c))
		return 0;
	return got;
}

static int refs(void *p, uint64_t len, uint32_t n)
{
	uint8_t c[TEST_CMD_SIZE];
	test_cmd(c, 4, 0);
	put64(c, 16, len);
	put64(c, 24, (uintptr_t)p);
	memcpy(c + 32, &n, 4);
	return ioctl(fd, IOMMU_TEST_CMD, c);
}

int main(void)
{
	uint8_t c[TEST_CMD_SIZE];
	fd = open("/dev/iommu", O_RDWR);
	struct ioas_alloc a = { .size = sizeof(a) };
	CHECK(fd >= 0 && ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0, "context and IOAS");
	test_cmd(c, 2, a.out_ioas_id);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "mock domain");
	uint32_t hwpt = get32(c, 20);
	test_cmd(c, 5, a.out_ioas_id);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "access");
	access_id = get32(c, 16);

	int mfd = memfd_create("guest-ram", MFD_CLOEXEC);
	CHECK(mfd >= 0 && ftruncate(mfd, LEN) == 0, "a memfd of guest RAM");
	uint8_t *ram = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	CHECK(ram != MAP_FAILED, "mapped shared");
	memset(ram, 'R', LEN);

	struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = a.out_ioas_id,
			      .user_va = (uintptr_t)ram, .length = LEN };
	CHECK(ioctl(fd, IOMMU_IOAS_MAP, &m) == 0, "IOAS_MAP of the mapping");
	test_cmd(c, 3, hwpt);
	put64(c, 16, m.iova);
	put64(c, 24, LEN);
	put64(c, 32, (uintptr_t)ram);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MD_CHECK_MAP: the mapping's pages");
	CHECK(refs(ram, LEN, 1) == 0, "pinned once");

	struct ioas_map_file mf = { .size = sizeof(mf), .flags = 6, .ioas_id = a.out_ioas_id, .fd = mfd,
				    .start = 0, .length = LEN };
	CHECK(ioctl(fd, IOMMU_IOAS_MAP_FILE, &mf) == 0, "IOAS_MAP_FILE of the same memfd");
	CHECK(refs(ram, LEN, 2) == 0, "the same pages, pinned twice");

	ram[3 * PAGE] = 'w';
	CHECK(dma_read(m.iova + 3 * PAGE) == 'w' && dma_read(mf.iova + 3 * PAGE) == 'w',
	      "a store through the mapping reaches both IOVAs");
	CHECK(pwrite(mfd, "f", 1, 5 * PAGE) == 1 && ram[5 * PAGE] == 'f' && dma_read(m.iova + 5 * PAGE) == 'f',
	      "a write to the file reaches the mapping and the IOVA");
	CHECK(munmap(ram, LEN) == 0 && close(mfd) == 0, "munmap and close the memfd");
	CHECK(dma_read(m.iova + 3 * PAGE) == 'w' && dma_read(mf.iova + 1) == 'R', "the IOAS still reads guest RAM");
	printf("done\n");
	return 0;
}
