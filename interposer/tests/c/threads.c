/*
 * Several threads issue ioctls on one iommufd descriptor at once (run
 * under the interposer by tests/preload.rs): each maps its own buffer
 * into one shared IOAS with a mock domain, checks the mapping and the pin
 * count, and unmaps, many times. Exits non-zero on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define THREADS 4
#define ROUNDS 100
#define LEN (8 * PAGE)


static int fd;
static uint32_t ioas, hwpt;

static void *worker(void *arg)
{
	long me = (long)arg;
	uint8_t *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t c[TEST_CMD_SIZE];
	if (buf == MAP_FAILED)
		return "mmap";
	memset(buf, (int)me, LEN);
	for (int r = 0; r < ROUNDS; r++) {
		struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = ioas,
				      .user_va = (uintptr_t)buf, .length = LEN };
		if (ioctl(fd, IOMMU_IOAS_MAP, &m))
			return "IOAS_MAP";
		test_cmd(c, 3, hwpt); /* MD_CHECK_MAP */
		put64(c, 16, m.iova);
		put64(c, 24, LEN);
		put64(c, 32, (uintptr_t)buf);
		if (ioctl(fd, IOMMU_TEST_CMD, c))
			return "MD_CHECK_MAP";
		test_cmd(c, 4, 0); /* MD_CHECK_REFS: this thread's pages, once */
		put64(c, 16, LEN);
		put64(c, 24, (uintptr_t)buf);
		put32(c, 32, 1);
		if (ioctl(fd, IOMMU_TEST_CMD, c))
			return "MD_CHECK_REFS 1";
		struct ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = m.iova, .length = LEN };
		if (ioctl(fd, IOMMU_IOAS_UNMAP, &u) || u.length != LEN)
			return "IOAS_UNMAP";
		put32(c, 32, 0);
		if (ioctl(fd, IOMMU_TEST_CMD, c))
			return "MD_CHECK_REFS 0";
		if (buf[r] != (uint8_t)me || buf[LEN - 1 - r] != (uint8_t)me)
			return "contents";
	}
	return NULL;
}

int main(void)
{
	pthread_t t[THREADS];
	uint8_t c[TEST_CMD_SIZE];
	fd = open("/dev/iommu", O_RDWR);
	struct ioas_alloc a = { .size = sizeof(a) };
	if (fd < 0 || ioctl(fd, IOMMU_IOAS_ALLOC, &a)) {
		printf("FAIL - setup (errno %d)\n", errno);
		return 1;
	}
	ioas = a.out_ioas_id;
	test_cmd(c, 2, ioas); /* MOCK_DOMAIN */
	if (ioctl(fd, IOMMU_TEST_CMD, c)) {
		printf("FAIL - MOCK_DOMAIN (errno %d)\n", errno);
		return 1;
	}
	memcpy(&hwpt, c + 20, 4);
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(i + 1));
	int bad = 0;
	for (int i = 0; i < THREADS; i++) {
		void *r;
		pthread_join(t[i], &r);
		if (r) {
			printf("FAIL - thread %d: %s (errno %d)\n", i, (char *)r, errno);
			bad = 1;
		}
	}
	if (bad)
		return 1;
	printf("ok - %d threads x %d map/check/unmap rounds on one descriptor\n", THREADS, ROUNDS);
	close(fd);
	return 0;
}
