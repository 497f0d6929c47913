/*
 * Stores by another thread while their pages are pinned (run under the
 * interposer by tests/preload.rs). Pinning private memory moves its pages
 * into the library's store; a thread that keeps writing the buffer at
 * that moment must not lose a store. Each round maps a fresh buffer that
 * a writer thread is filling with a rising number, word by word, reading
 * every word back after each pass: a word that reads back older than
 * what was just written there is a lost store. Then the IOAS must see
 * what the writer wrote last. Exits non-zero on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define PAGES 64
#define LEN (PAGES * PAGE)
#define ROUNDS 200

static volatile uint64_t *words;
static atomic_int stop, started;
static atomic_ulong lost, passes;
static uint64_t last;

/* One word per page, rewritten with the pass number and read back. */
static void *writer(void *arg)
{
	(void)arg;
	uint64_t n = 0;
	atomic_store(&started, 1);
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		n++;
		for (int p = 0; p < PAGES; p++)
			words[p * (PAGE / 8)] = n;
		for (int p = 0; p < PAGES; p++)
			if (words[p * (PAGE / 8)] != n)
				atomic_fetch_add(&lost, 1);
	}
	last = n;
	atomic_fetch_add(&passes, n);
	return NULL;
}

int main(void)
{
	int fd = open("/dev/iommu", O_RDWR);
	REQUIRE(fd >= 0, "open /dev/iommu");
	struct ioas_alloc a = { .size = sizeof(a) };
	REQUIRE(ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0, "IOAS_ALLOC");
	uint8_t c[TEST_CMD_SIZE];
	test_cmd(c, 2, a.out_ioas_id); /* MOCK_DOMAIN */
	REQUIRE(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MOCK_DOMAIN");
	uint32_t hwpt = get32(c, 20);
	for (int r = 0; r < ROUNDS; r++) {
		void *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		REQUIRE(buf != MAP_FAILED, "mmap");
		memset(buf, 0, LEN);
		words = buf;
		atomic_store(&stop, 0);
		atomic_store(&started, 0);
		pthread_t t;
		REQUIRE(pthread_create(&t, NULL, writer, NULL) == 0, "pthread_create");
		while (!atomic_load(&started))
			;
		struct ioas_map m = { .size = sizeof(m), .flags = 6, .ioas_id = a.out_ioas_id,
				      .user_va = (uintptr_t)buf, .length = LEN };
		REQUIRE(ioctl(fd, IOMMU_IOAS_MAP, &m) == 0, "IOAS_MAP while another thread writes");
		/* Let the writer run a little on the moved pages too. */
		for (volatile int spin = 0; spin < 20000; spin++)
			;
		atomic_store(&stop, 1);
		REQUIRE(pthread_join(t, NULL) == 0, "pthread_join");
		REQUIRE(atomic_load(&lost) == 0, "no store lost while the pages moved");
		/* The buffer holds the writer's last pass in every page, and the
		 * domain maps the very pages the process sees. */
		for (int p = 0; p < PAGES; p++)
			REQUIRE(words[p * (PAGE / 8)] == last, "the buffer holds the last pass");
		test_cmd(c, 3, hwpt); /* MD_CHECK_MAP */
		put64(c, 16, m.iova);
		put64(c, 24, LEN);
		put64(c, 32, (uintptr_t)buf);
		REQUIRE(ioctl(fd, IOMMU_TEST_CMD, c) == 0, "MD_CHECK_MAP: the domain maps the buffer's pages");
		struct ioas_unmap u = { .size = sizeof(u), .ioas_id = a.out_ioas_id, .iova = m.iova, .length = LEN };
		REQUIRE(ioctl(fd, IOMMU_IOAS_UNMAP, &u) == 0, "IOAS_UNMAP");
		munmap(buf, LEN);
	}
	printf("ok - %d rounds of %d pages pinned while a thread wrote them (%lu passes): no store lost\n", ROUNDS,
	       PAGES, atomic_load(&passes));
	close(fd);
	printf("done\n");
	return 0;
}
