/*
 * Pins charged across contexts and processes, as Linux charges them (run
 * under the interposer by tests/preload.rs, without CAP_IPC_LOCK, so pins
 * are charged). RLIMIT_MEMLOCK is lowered to 16 pages; RLIMIT_MODE 0
 * charges the user (every context of every process of the user), mode 1
 * the process (every context of the process).
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
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL


static uint8_t *mem;

/* A context whose IOAS has a mock domain (maps pin); mode 1 charges the
 * process. Returns the descriptor, the IOAS in *ioas. */
static int context(uint32_t *ioas, int mode)
{
	uint8_t c[TEST_CMD_SIZE];
	int fd = open("/dev/iommu", O_RDWR);
	if (fd < 0)
		return -1;
	if (mode) {
		struct option o = { .size = sizeof(o), .option_id = 0, .op = 0, .val64 = 1 };
		if (ioctl(fd, IOMMU_OPTION, &o))
			return -1;
	}
	struct ioas_alloc a = { .size = sizeof(a) };
	if (ioctl(fd, IOMMU_IOAS_ALLOC, &a))
		return -1;
	*ioas = a.out_ioas_id;
	test_cmd(c, 2, *ioas); /* MOCK_DOMAIN */
	return ioctl(fd, IOMMU_TEST_CMD, c) ? -1 : fd;
}

/* Maps `pages` pages of `mem` from page `first`; the IOVA in *iova. */
static int map(int fd, uint32_t ioas, int first, int pages, uint64_t *iova)
{
	struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = ioas,
			      .user_va = (uintptr_t)(mem + first * PAGE), .length = pages * PAGE };
	int r = ioctl(fd, IOMMU_IOAS_MAP, &m);
	*iova = m.iova;
	return r;
}

static int unmap(int fd, uint32_t ioas, uint64_t iova, int pages)
{
	struct ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = iova, .length = pages * PAGE };
	return ioctl(fd, IOMMU_IOAS_UNMAP, &u);
}

/* In a child: whether mapping `pages` pages in a new context works. */
static int child_maps(int pages)
{
	pid_t pid = fork();
	if (pid == 0) {
		uint32_t ioas;
		uint64_t iova;
		int fd = context(&ioas, 0);
		_exit(fd >= 0 && map(fd, ioas, 40, pages, &iova) == 0 ? 0 : (errno == ENOMEM ? 2 : 1));
	}
	int st;
	waitpid(pid, &st, 0);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

int main(int argc, char **argv)
{
	int mm_mode = argc > 1 && !strcmp(argv[1], "mm");
	struct rlimit r = { 16 * PAGE, 16 * PAGE };
	CHECK(setrlimit(RLIMIT_MEMLOCK, &r) == 0, "RLIMIT_MEMLOCK lowered to 16 pages");
	mem = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(mem, 1, 64 * PAGE);
	uint32_t a, b;
	uint64_t ia, ib, ib2;
	(void)ib2;
	int fa = context(&a, 0), fb = context(&b, 0);
	CHECK(fa >= 0 && fb >= 0, "two contexts");

	/* The user's counter: both contexts and every process of the user. */
	CHECK(map(fa, a, 0, 10, &ia) == 0, "10 pages in the first context");
	CHECK(map(fb, b, 10, 10, &ib) == -1 && errno == ENOMEM, "10 more in the second: ENOMEM (20 > 16)");
	CHECK(map(fb, b, 10, 6, &ib) == 0, "6 more in the second: 16 in all");
	CHECK(child_maps(1) == 2, "a child process of the same user: ENOMEM for 1 page");
	CHECK(map(fa, a, 0, 1, &ib2) == -1 && errno == ENOMEM,
	      "1 page mapped twice is charged twice, as on Linux (a charge per map): ENOMEM");
	CHECK(unmap(fa, a, ia, 10) == 0, "the first context's pages unmapped");
	CHECK(child_maps(10) == 0, "now a child maps 10 (6 + 10)");
	CHECK(child_maps(10) == 0, "and another after it (the first child's pins went with it)");

	if (mm_mode) {
		/* The process's counter: contexts in RLIMIT_MODE 1 share it, apart
		 * from the user's. */
		uint32_t c, d;
		int fc = context(&c, 1);
		if (fc < 0 && errno == EPERM) {
			printf("skip - RLIMIT_MODE 1 needs CAP_SYS_RESOURCE\n");
			printf("done\n");
			return 0;
		}
		int fd = context(&d, 1);
		CHECK(fc >= 0 && fd >= 0, "two contexts charging the process");
		uint64_t ic, id;
		CHECK(map(fc, c, 20, 12, &ic) == 0, "12 pages charged to the process (the user's 6 apart)");
		CHECK(map(fd, d, 32, 5, &id) == -1 && errno == ENOMEM, "5 more to the process: ENOMEM (17 > 16)");
		CHECK(map(fd, d, 32, 4, &id) == 0, "4 more: 16");
		CHECK(unmap(fc, c, ic, 12) == 0, "unmapped");
		CHECK(map(fd, d, 40, 12, &id) == 0, "12 more now");
	}
	printf("done\n");
	return 0;
}
