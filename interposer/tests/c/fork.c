/*
 * fork with pinned memory and an open context (run under the interposer
 * by tests/preload.rs). Linux: the child's stores to private memory stay
 * its own (pinned pages are copied for it), shared memory stays shared,
 * and the child may open contexts of its own. The interposer refuses the
 * inherited descriptor (EOPNOTSUPP) instead of answering from a copy.
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
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL


static int ioas_map(int fd, uint32_t ioas, void *buf, uint64_t len, uint64_t *iova)
{
	struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = ioas, .user_va = (uintptr_t)buf, .length = len };
	int r = ioctl(fd, IOMMU_IOAS_MAP, &m);
	*iova = m.iova;
	return r;
}

static uint32_t ioas_alloc(int fd)
{
	struct ioas_alloc a = { .size = sizeof(a) };
	return ioctl(fd, IOMMU_IOAS_ALLOC, &a) ? 0 : a.out_ioas_id;
}

int main(void)
{
	uint8_t c[TEST_CMD_SIZE];
	int fd = open("/dev/iommu", O_RDWR);
	uint32_t ioas = ioas_alloc(fd);
	CHECK(fd >= 0 && ioas, "a context and an IOAS");
	test_cmd(c, 2, ioas); /* MOCK_DOMAIN: maps now pin */
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "a mock domain");
	uint8_t *priv = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *shared = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(priv != MAP_FAILED && shared != MAP_FAILED, "a private and a shared buffer");
	memset(priv, 'P', 4 * PAGE);
	memset(shared, 'S', 4 * PAGE);
	uint64_t piova, siova;
	CHECK(ioas_map(fd, ioas, priv, 4 * PAGE, &piova) == 0 && ioas_map(fd, ioas, shared, 4 * PAGE, &siova) == 0,
	      "both pinned");
	test_cmd(c, 4, 0); /* MD_CHECK_REFS */
	put64(c, 16, 4 * PAGE);
	put64(c, 24, (uintptr_t)priv);
	c[32] = 1;
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "the private pages pinned once");
	test_cmd(c, 5, ioas); /* CREATE_ACCESS */
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "an access");
	uint32_t access = get32(c, 16);

	pid_t child = fork();
	if (child == 0) {
		struct ioas_alloc a = { .size = sizeof(a) };
		errno = 0;
		CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &a) == -1 && errno == EOPNOTSUPP,
		      "child: the inherited descriptor is refused");
		priv[0] = 'C';
		shared[0] = 'C';
		int own = open("/dev/iommu", O_RDWR);
		uint32_t own_ioas = ioas_alloc(own);
		uint64_t iova;
		test_cmd(c, 2, own_ioas);
		CHECK(own >= 0 && own_ioas && ioctl(own, IOMMU_TEST_CMD, c) == 0, "child: a context and a mock domain");
		CHECK(ioas_map(own, own_ioas, priv, 4 * PAGE, &iova) == 0, "child: its context pins its memory");
		test_cmd(c, 4, 0); /* MD_CHECK_REFS: the child's pins only */
		put64(c, 16, 4 * PAGE);
		put64(c, 24, (uintptr_t)priv);
		c[32] = 1;
		CHECK(ioctl(own, IOMMU_TEST_CMD, c) == 0, "child: its pages pinned once");
		CHECK(close(own) == 0 && close(fd) == 0 && priv[0] == 'C', "child: close both");
		exit(0);
	}
	int status;
	CHECK(child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the child passed");
	CHECK(priv[0] == 'P', "the child's store to private memory stayed its own");
	CHECK(shared[0] == 'C', "shared memory stayed shared");
	uint8_t got = 0;
	test_cmd(c, 8, access); /* ACCESS_RW read one byte at the private IOVA */
	put64(c, 16, piova);
	put64(c, 24, 1);
	put64(c, 32, (uintptr_t)&got);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0 && got == 'P', "the parent's IOAS reads the parent's page");
	priv[1] = 'Q';
	put64(c, 16, piova + 1);
	CHECK(ioctl(fd, IOMMU_TEST_CMD, c) == 0 && got == 'Q', "and still shares it with the parent");
	CHECK(close(access) == 0 && close(fd) == 0, "close");
	printf("done\n");
	return 0;
}
