/*
 * Linux's fault-injection files as the interposer serves them (run by
 * tests/preload.rs): arming /proc/self/task/<tid>/fail-nth makes the Nth
 * fault point of the thread fail with ENOMEM, reading it back says
 * whether the fault was injected, and a sweep over N reaches a count past
 * the last point, where the sequence succeeds.
 */
#define _GNU_SOURCE
#include <dirent.h>
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


static int nth;

static void arm(unsigned n)
{
	char b[16];
	int len = snprintf(b, sizeof(b), "%u", n);
	REQUIRE(pwrite(nth, b, len, 0) == len, "arm");
}

static long left(void)
{
	char b[16] = { 0 };
	REQUIRE(pread(nth, b, sizeof(b) - 1, 0) > 1, "read back");
	return strtol(b, NULL, 10);
}

/* open, IOAS_ALLOC, IOAS_MAP: 0 on success, else the errno. */
static int sequence(uint8_t *buf)
{
	int fd = open("/dev/iommu", O_RDWR);
	if (fd < 0)
		return errno;
	struct ioas_alloc a = { .size = sizeof(a) };
	int r = ioctl(fd, IOMMU_IOAS_ALLOC, &a) ? errno : 0;
	struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = a.out_ioas_id,
			      .user_va = (uintptr_t)buf, .length = 4 * PAGE };
	if (!r)
		r = ioctl(fd, IOMMU_IOAS_MAP, &m) ? errno : 0;
	close(fd);
	return r;
}

int main(void)
{
	char path[64];
	DIR *d = opendir("/sys/kernel/debug/");
	REQUIRE(d != NULL, "opendir debugfs");
	int fd = openat(dirfd(d), "failslab/ignore-gfp-wait", O_WRONLY);
	REQUIRE(fd >= 0 && write(fd, "N", 1) == 1 && close(fd) == 0, "write a failslab setting");
	closedir(d);
	printf("ok - the debugfs settings are there\n");

	snprintf(path, sizeof(path), "/proc/self/task/%d/fail-nth", gettid());
	nth = open(path, O_RDWR);
	REQUIRE(nth >= 0, "open fail-nth");
	REQUIRE(left() == 0, "disarmed at first");

	uint8_t *buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	REQUIRE(buf != MAP_FAILED, "mmap");
	arm(1);
	errno = 0;
	REQUIRE(open("/dev/iommu", O_RDWR) == -1 && errno == ENOMEM, "the first point (the open) fails");
	REQUIRE(left() == 0, "reads 0 once injected");
	printf("ok - fail-nth 1 fails the open with ENOMEM\n");

	unsigned n;
	int injected = 0;
	for (n = 1; n < 400; n++) {
		arm(n);
		int r = sequence(buf);
		long l = left();
		arm(0);
		if (l != 0) {
			REQUIRE(r == 0, "past the last point the sequence succeeds");
			break;
		}
		REQUIRE(r == ENOMEM, "an injected fault is ENOMEM");
		injected++;
	}
	REQUIRE(n < 400 && injected >= 3, "the sweep ends after a few points");
	printf("ok - a sweep failed each of %d fault points with ENOMEM, then succeeded\n", injected);
	return 0;
}
