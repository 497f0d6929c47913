/*
 * Random iommufd ioctls with random arguments and pointers through the
 * interposer (tests/preload.rs runs it): the process must survive every
 * call, and every failure must be one of the errnos iommufd uses.
 * Pointers come from a small set: NULL, low addresses, kernel and
 * non-canonical addresses, the last page, an arena (random bytes) and the
 * PROT_NONE page right after it. Never the program's own stack or heap.
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

#define PAGE 4096UL
#define ARENA_PAGES 64UL
#define CALLS 20000

static uint64_t s = 0x9e3779b97f4a7c15ULL;
static uint64_t rnd(void)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

static uint8_t *arena;

static uint64_t pointer(void)
{
	switch (rnd() % 10) {
	case 0: return 0;
	case 1: return rnd() % 0x10000;
	case 2: return 0xffff800000000000ULL + (rnd() % 0x100000);
	case 3: return 0x0000800000000000ULL + rnd() % PAGE;
	case 4: return 0xfffffffffffff000ULL + rnd() % PAGE;
	case 5: return (uintptr_t)arena + ARENA_PAGES * PAGE - 1 - rnd() % 64;
	case 6: return (uintptr_t)arena + ARENA_PAGES * PAGE + rnd() % PAGE;
	default: return (uintptr_t)arena + rnd() % (ARENA_PAGES * PAGE);
	}
}

static unsigned long command(void)
{
	static const unsigned nrs[] = { 0x64, 0x65, 0x66, 0x70, 0x71, 0x72, 0x75 };
	unsigned nr;
	if (rnd() % 8 == 0)
		nr = nrs[rnd() % (sizeof(nrs) / sizeof(nrs[0]))];
	else
		nr = 0x80 + rnd() % 0x21;
	unsigned long cmd = (';' << 8) | nr;
	if (rnd() % 16 == 0)
		cmd |= (rnd() & 0xffff) << 16;
	return cmd;
}

/* A plausible command struct at p: a size, small ids, pointers, lengths. */
static void fill(uint8_t *p, size_t room)
{
	for (size_t i = 0; i + 8 <= room && i < 128; i += 8) {
		uint64_t v;
		switch (rnd() % 6) {
		case 0: v = rnd(); break;
		case 1: v = rnd() % 8 | (rnd() % 8) << 32; break;
		case 2: v = pointer(); break;
		case 3: v = (rnd() % 64) * PAGE; break;
		case 4: v = (1ULL << 24) + (rnd() % 256) * PAGE; break;
		default: v = rnd() % 0x100 | (rnd() % 0x100) << 32; break;
		}
		memcpy(p + i, &v, 8);
	}
	if (room >= 4) {
		static const uint32_t sizes[] = { 8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80 };
		uint32_t size = rnd() % 2 ? sizes[rnd() % 11] : rnd() % 4 ? (uint32_t)(rnd() % 96) : (uint32_t)rnd();
		memcpy(p, &size, 4);
	}
}

int main(void)
{
	arena = mmap(NULL, (ARENA_PAGES + 1) * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (arena == MAP_FAILED || mprotect(arena + ARENA_PAGES * PAGE, PAGE, PROT_NONE))
		return 2;
	int fd = open("/dev/iommu", O_RDWR);
	if (fd < 0)
		return 3;
	int ok = 0, failed = 0;
	for (int i = 0; i < CALLS; i++) {
		if (rnd() % 64 == 0) {
			/* A fresh context now and then, so the ids stay small. */
			close(fd);
			fd = open("/dev/iommu", O_RDWR);
			if (fd < 0)
				return 4;
		}
		uint64_t arg = pointer();
		if (arg >= (uintptr_t)arena && arg < (uintptr_t)arena + ARENA_PAGES * PAGE)
			fill((uint8_t *)(uintptr_t)arg, (uintptr_t)arena + ARENA_PAGES * PAGE - arg);
		errno = 0;
		int r = ioctl(fd, command(), (void *)(uintptr_t)arg);
		if (r >= 0) {
			ok++;
			continue;
		}
		failed++;
		switch (errno) {
		case EPERM: case ENOENT: case EINTR: case EIO: case ENXIO: case E2BIG: case EBADF:
		case EAGAIN: case ENOMEM: case EFAULT: case EBUSY: case EEXIST: case EXDEV: case ENODEV:
		case EINVAL: case ENOTTY: case ENOSPC: case ESPIPE: case ERANGE: case EBADE: case EDEADLK:
		case EOVERFLOW: case EBADFD: case EMSGSIZE: case EOPNOTSUPP: case EADDRINUSE: case ETIMEDOUT:
			break;
		default:
			printf("FAIL - call %d: unexpected errno %d\n", i, errno);
			return 1;
		}
	}
	close(fd);
	printf("ok - %d random calls survived (%d succeeded, %d failed with iommufd errnos)\n", CALLS, ok, failed);
	return 0;
}
