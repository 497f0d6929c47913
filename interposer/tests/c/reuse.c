/*
 * Store offsets are reused (run under the interposer by tests/preload.rs):
 * 64 rounds of a fresh 4 MiB buffer, written, mapped into an IOAS with a
 * mock domain (its pages move into the library's store), checked through
 * the domain, unmapped and munmapped. Without reuse the store would reach
 * 256 MiB of offsets; with it, the moved pages' store offsets (seen in
 * /proc/self/maps) stay within a few buffers' worth.
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
#define LEN (4UL << 20)


/* The highest end offset of a mapping of the store in /proc/self/maps. */
static uint64_t store_top(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	uint64_t top = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long s, e, off;
		if (strstr(line, "portcullis-store") && sscanf(line, "%lx-%lx %*s %lx", &s, &e, &off) == 3 &&
		    off + (e - s) > top)
			top = off + (e - s);
	}
	if (f)
		fclose(f);
	return top;
}

int main(void)
{
	uint8_t c[TEST_CMD_SIZE];
	int fd = open("/dev/iommu", O_RDWR);
	struct ioas_alloc a = { .size = sizeof(a) };
	REQUIRE(fd >= 0 && ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0, "a context and an IOAS");
	test_cmd(c, 2, a.out_ioas_id); /* MOCK_DOMAIN */
	REQUIRE(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "a mock domain");
	uint32_t hwpt = get32(c, 20);
	uint64_t top = 0;
	for (int round = 0; round < 64; round++) {
		uint8_t *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		REQUIRE(buf != MAP_FAILED, "a buffer");
		memset(buf, round & 0xff, LEN);
		struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = a.out_ioas_id,
				      .user_va = (uintptr_t)buf, .length = LEN };
		REQUIRE(ioctl(fd, IOMMU_IOAS_MAP, &m) == 0, "map");
		/* MD_CHECK_MAP: the domain maps the buffer's (moved) pages. */
		test_cmd(c, 3, hwpt); /* MD_CHECK_MAP */
		put64(c, 16, m.iova);
		put64(c, 24, LEN);
		put64(c, 32, (uintptr_t)buf);
		REQUIRE(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "the domain maps the buffer");
		REQUIRE(buf[LEN - 1] == (round & 0xff), "the buffer kept its contents");
		uint64_t t = store_top();
		if (t > top)
			top = t;
		struct ioas_unmap u = { .size = sizeof(u), .ioas_id = a.out_ioas_id, .iova = m.iova, .length = LEN };
		REQUIRE(ioctl(fd, IOMMU_IOAS_UNMAP, &u) == 0, "unmap");
		REQUIRE(munmap(buf, LEN) == 0, "munmap");
	}
	printf("store offsets reached %lu MiB over 64 rounds of 4 MiB\n", (unsigned long)(top >> 20));
	REQUIRE(top > 0 && top <= 24UL << 20, "store offsets reused");
	printf("done\n");
	return 0;
}
