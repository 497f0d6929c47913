/* What the C test programs share: their checks, ioctl numbers and structs
 * of the iommufd uAPI, the selftest command buffer and little-endian field
 * access. Their own includes come first (errno.h, stdint.h, stdio.h,
 * stdlib.h, string.h). */
#ifndef PORTCULLIS_TEST_COMMON_H
#define PORTCULLIS_TEST_COMMON_H

/* Exits with status 1 and a FAIL line (the check, its line, errno) when
 * `cond` is false. CHECK also prints "ok - what" when it holds (the Rust
 * tests look for those lines); REQUIRE, for checks in loops, says nothing. */
#define REQUIRE(cond, what)                                                        \
	do {                                                                       \
		if (!(cond)) {                                                     \
			printf("FAIL - %s (line %d, errno %d %s)\n", what, __LINE__, \
			       errno, strerror(errno));                            \
			fflush(stdout);                                            \
			exit(1);                                                   \
		}                                                                  \
	} while (0)
#define CHECK(cond, what)                                                          \
	do {                                                                       \
		REQUIRE(cond, what);                                               \
		printf("ok - %s\n", what);                                         \
		fflush(stdout);                                                    \
	} while (0)

#define IOCTL_NR(nr) ((unsigned long)((';' << 8) | (nr)))
#define IOMMU_DESTROY IOCTL_NR(0x80)
#define IOMMU_IOAS_ALLOC IOCTL_NR(0x81)
#define IOMMU_IOAS_ALLOW_IOVAS IOCTL_NR(0x82)
#define IOMMU_IOAS_MAP IOCTL_NR(0x85)
#define IOMMU_IOAS_UNMAP IOCTL_NR(0x86)
#define IOMMU_OPTION IOCTL_NR(0x87)
#define IOMMU_HWPT_ALLOC IOCTL_NR(0x89)
#define IOMMU_FAULT_QUEUE_ALLOC IOCTL_NR(0x8e)
#define IOMMU_IOAS_MAP_FILE IOCTL_NR(0x8f)
#define IOMMU_TEST_CMD IOCTL_NR(0xa0)

/* The uAPI structs the programs share (linux/iommufd.h, same layout). */
struct ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; };
struct ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct fault_alloc { uint32_t size, flags, out_fault_id, out_fault_fd; };
struct option { uint32_t size, option_id; uint16_t op, reserved; uint32_t object_id; uint64_t val64; };

/* struct iommu_test_cmd: a 16-byte header, then the op's payload. */
#define TEST_CMD_SIZE 72

/* A zeroed selftest command `op` on object `id`. */
static inline void test_cmd(uint8_t *b, uint32_t op, uint32_t id)
{
	uint32_t size = TEST_CMD_SIZE;
	memset(b, 0, TEST_CMD_SIZE);
	memcpy(b, &size, 4);
	memcpy(b + 4, &op, 4);
	memcpy(b + 8, &id, 4);
}
static inline void put32(uint8_t *b, int at, uint32_t v) { memcpy(b + at, &v, 4); }
static inline void put64(uint8_t *b, int at, uint64_t v) { memcpy(b + at, &v, 8); }
static inline uint32_t get32(const uint8_t *b, int at) { uint32_t v; memcpy(&v, b + at, 4); return v; }

#endif
