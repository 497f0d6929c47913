// Records Linux's answers to seeded random iommufd uAPI calls, for differential
// replay against another implementation. Output: one JSON object per call on
// stdout, prefixed "REC ". Memory the calls point at lives at fixed addresses:
// ARENA (64 MiB, user_va targets) and AUX (one page, iova range arrays), so a
// replay can provide the same address space.
// usage: uapi_record SEED_FIRST SEED_COUNT STEPS [MIX]
// MIX 1 (default): the IOAS commands of the first recordings (the same calls
// as ever for a seed). MIX 2: also HWPT_ALLOC (paging, NEST_PARENT, dirty,
// nested with selftest data, FAULT_ID_VALID), GET_HW_INFO, dirty tracking and
// bitmaps, HWPT_INVALIDATE, fault queues with their read(2)/write(2) (recorded
// as pseudo-commands 0xf0000001 read and 0xf0000002 write: `in` is {u32 fd,
// u32 count} plus 16 zero bytes, the buffer is the aux page, `ret` the byte
// count), and the selftest ops MOCK_DOMAIN_FLAGS, MOCK_DOMAIN_REPLACE, DIRTY,
// MD_CHECK_IOTLB and TRIGGER_IOPF.
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
#include <linux/iommufd.h>
#include <linux/types.h>
#include "iommufd_test.h"

#define ARENA ((uint8_t *)0x100000000000ull)
#define ARENA_LEN (64ull << 20)
#define AUX ((uint8_t *)0x200000000000ull)
#define PG 4096ull

static uint64_t rs;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }
static int chance(int pct) { return (int)below(100) < pct; }

static uint32_t ids[64];
static int nids;
static uint64_t iovas[64];
static int niovas;

static uint32_t pick_id(void) {
	if (nids && chance(85)) return ids[below(nids)];
	return (uint32_t)below(24);
}
static void add_id(uint32_t id) { if (id) ids[nids < 64 ? nids++ : below(64)] = id; }
static void add_iova(uint64_t v) { iovas[niovas < 64 ? niovas++ : below(64)] = v; }

static uint64_t pick_iova(void) {
	switch (below(8)) {
	case 0: return 0;
	case 1: return (1ull << 24) + PG * below(4096);
	case 2: return niovas ? iovas[below(niovas)] : PG;
	case 3: return niovas ? iovas[below(niovas)] + PG * below(8) : 2 * PG;
	case 4: return PG * below(1u << 20);
	case 5: return (1ull << 24) + below(PG);
	case 6: return UINT64_MAX - PG * below(4);
	default: return (1ull << 31) - PG * (1 + below(16));
	}
}
static uint64_t pick_len(void) {
	switch (below(7)) {
	case 0: return 0;
	case 1: return PG * (1 + below(4));
	case 2: return PG * (1 + below(256));
	case 3: return (2ull << 20) * (1 + below(4));
	case 4: return PG * (1 + below(16)) + below(PG);
	case 5: return UINT64_MAX;
	default: return PG * (1 + below(64));
	}
}
static uint64_t pick_va(void) {
	if (chance(4)) return (uint64_t)(uintptr_t)ARENA + ARENA_LEN + PG * below(64);
	if (chance(4)) return (uint64_t)(uintptr_t)ARENA + below(PG);
	return (uint64_t)(uintptr_t)ARENA + PG * below(ARENA_LEN / PG / 2);
}

static void hex(const char *key, const void *p, size_t n) {
	const uint8_t *b = p;
	printf("\"%s\":\"", key);
	for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
	printf("\"");
}

// Perturbs a command struct the way careless or hostile callers do: short or
// long sizes, non-zero tails, stray flag bits. Returns the size to record.
static size_t mutate(uint8_t *buf, size_t real) {
	uint32_t *size = (uint32_t *)buf;
	*size = (uint32_t)real;
	if (chance(4)) *size = (uint32_t)real - 4;
	else if (chance(4)) *size = (uint32_t)real + 8;
	else if (chance(3)) { *size = (uint32_t)real + 8; buf[real + 3] = 0x5a; }
	else if (chance(2)) *size = 0;
	return real + 16;
}

static void step(int fd, int seed, int i) {
	uint8_t buf[256] = {0}, aux_in[128] = {0};
	unsigned long cmd;
	size_t real;
	int kind = (int)below(100);
	if (kind < 10) {
		struct iommu_ioas_alloc *a = (void *)buf; cmd = IOMMU_IOAS_ALLOC; real = sizeof(*a);
		if (chance(5)) a->flags = 1u << below(32);
	} else if (kind < 16) {
		struct iommu_destroy *d = (void *)buf; cmd = IOMMU_DESTROY; real = sizeof(*d);
		d->id = pick_id();
	} else if (kind < 44) {
		struct iommu_ioas_map *m = (void *)buf; cmd = IOMMU_IOAS_MAP; real = sizeof(*m);
		m->ioas_id = pick_id();
		m->flags = (uint32_t)below(8);
		if (chance(3)) m->flags |= 1u << (3 + below(29));
		if (chance(3)) m->__reserved = 1;
		m->user_va = pick_va(); m->length = pick_len(); m->iova = pick_iova();
	} else if (kind < 62) {
		struct iommu_ioas_unmap *u = (void *)buf; cmd = IOMMU_IOAS_UNMAP; real = sizeof(*u);
		u->ioas_id = pick_id();
		if (chance(10)) { u->iova = 0; u->length = UINT64_MAX; }
		else { u->iova = pick_iova(); u->length = pick_len(); }
	} else if (kind < 70) {
		struct iommu_ioas_copy *c = (void *)buf; cmd = IOMMU_IOAS_COPY; real = sizeof(*c);
		c->dst_ioas_id = pick_id(); c->src_ioas_id = pick_id();
		c->flags = (uint32_t)below(8);
		if (chance(3)) c->flags |= 1u << (3 + below(29));
		c->length = pick_len(); c->dst_iova = pick_iova(); c->src_iova = pick_iova();
	} else if (kind < 77) {
		struct iommu_ioas_iova_ranges *r = (void *)buf; cmd = IOMMU_IOAS_IOVA_RANGES; real = sizeof(*r);
		r->ioas_id = pick_id(); r->num_iovas = (uint32_t)below(5);
		r->allowed_iovas = chance(90) ? (uint64_t)(uintptr_t)AUX : 8;
		if (chance(3)) r->__reserved = 1;
	} else if (kind < 83) {
		struct iommu_ioas_allow_iovas *w = (void *)buf; cmd = IOMMU_IOAS_ALLOW_IOVAS; real = sizeof(*w);
		w->ioas_id = pick_id(); w->num_iovas = (uint32_t)below(4);
		w->allowed_iovas = (uint64_t)(uintptr_t)AUX;
		struct iommu_iova_range *rg = (void *)aux_in;
		for (unsigned k = 0; k < 4; k++) {
			rg[k].start = pick_iova();
			rg[k].last = chance(80) ? rg[k].start + pick_len() - 1 : rg[k].start - 1;
		}
	} else if (kind < 89) {
		struct iommu_option *o = (void *)buf; cmd = IOMMU_OPTION; real = sizeof(*o);
		o->option_id = (uint32_t)below(3);
		o->op = (uint16_t)below(3);
		o->object_id = o->option_id == IOMMU_OPTION_HUGE_PAGES ? pick_id() : (chance(80) ? 0 : pick_id());
		o->val64 = below(3);
	} else if (kind < 96) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_MOCK_DOMAIN; t->id = pick_id();
	} else {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_ADD_RESERVED; t->id = pick_id();
		t->add_reserved.start = pick_iova(); t->add_reserved.length = pick_len();
	}
	size_t rec = mutate(buf, real);
	memcpy(AUX, aux_in, sizeof(aux_in));
	printf("REC {\"seed\":%d,\"step\":%d,\"cmd\":\"0x%lx\",", seed, i, cmd);
	hex("in", buf, rec); printf(","); hex("aux_in", aux_in, sizeof(aux_in));
	errno = 0;
	int ret = ioctl(fd, cmd, buf);
	int err = ret ? errno : 0;
	printf(",\"ret\":%d,\"errno\":%d,", ret, err);
	hex("out", buf, rec); printf(","); hex("aux_out", AUX, sizeof(aux_in));
	printf("}\n");
	if (ret == 0) {
		if (cmd == IOMMU_IOAS_ALLOC) add_id(((struct iommu_ioas_alloc *)buf)->out_ioas_id);
		if (cmd == IOMMU_IOAS_MAP) add_iova(((struct iommu_ioas_map *)buf)->iova);
		if (cmd == IOMMU_IOAS_COPY) add_iova(((struct iommu_ioas_copy *)buf)->dst_iova);
		if (cmd == IOMMU_TEST_CMD && ((struct iommu_test_cmd *)buf)->op == IOMMU_TEST_OP_MOCK_DOMAIN) {
			struct iommu_test_cmd *t = (void *)buf;
			add_id(t->mock_domain.out_stdev_id);
			add_id(t->mock_domain.out_hwpt_id);
			add_id(t->mock_domain.out_idev_id);
		}
	}
}


// ---- MIX 2 -------------------------------------------------------------
#define PSEUDO_READ 0xf0000001ul
#define PSEUDO_WRITE 0xf0000002ul
struct list { uint32_t v[64]; int n; };
static struct list l_ioas, l_idev, l_stdev, l_hwpt, l_nested, l_fault, l_fd, l_parent;
static void ladd(struct list *l, uint32_t v) { if (v) l->v[l->n < 64 ? l->n++ : below(64)] = v; }
static uint32_t lpick(struct list *l) { return l->n && chance(88) ? l->v[below(l->n)] : (uint32_t)below(24); }
static uint32_t any_hwpt(void) { return chance(50) ? lpick(&l_hwpt) : lpick(&l_nested); }
static uint64_t small_len(void) {
	switch (below(5)) {
	case 0: return PG * (1 + below(8));
	case 1: return PG * (1 + below(64));
	case 2: return 0;
	case 3: return PG * below(4) + below(PG);
	default: return (2ull << 20);
	}
}

static void step2(int fd, int seed, int i) {
	uint8_t buf[256] = {0}, aux_in[128] = {0}, in_copy[256];
	unsigned long cmd;
	size_t real;
	int kind = (int)below(100), pseudo = 0;
	uint32_t pfd = 0, pcount = 0;
	if (kind < 6) {
		struct iommu_ioas_alloc *a = (void *)buf; cmd = IOMMU_IOAS_ALLOC; real = sizeof(*a);
	} else if (kind < 9) {
		struct iommu_destroy *d = (void *)buf; cmd = IOMMU_DESTROY; real = sizeof(*d);
		switch (below(5)) {
		case 0: d->id = lpick(&l_hwpt); break;
		case 1: d->id = lpick(&l_nested); break;
		case 2: d->id = lpick(&l_fault); break;
		case 3: d->id = lpick(&l_ioas); break;
		default: d->id = pick_id();
		}
	} else if (kind < 20) {
		struct iommu_ioas_map *m = (void *)buf; cmd = IOMMU_IOAS_MAP; real = sizeof(*m);
		m->ioas_id = lpick(&l_ioas);
		m->flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
		if (chance(70)) m->flags |= IOMMU_IOAS_MAP_FIXED_IOVA;
		m->user_va = pick_va(); m->length = chance(70) ? PG * (1 + below(64)) : pick_len();
		m->iova = chance(70) ? (1ull << 24) + PG * below(256) : pick_iova();
	} else if (kind < 25) {
		struct iommu_ioas_unmap *u = (void *)buf; cmd = IOMMU_IOAS_UNMAP; real = sizeof(*u);
		u->ioas_id = lpick(&l_ioas);
		if (chance(20)) { u->iova = 0; u->length = UINT64_MAX; }
		else { u->iova = (1ull << 24) + PG * below(256); u->length = PG * (1 + below(64)); }
	} else if (kind < 31) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->id = lpick(&l_ioas);
		if (chance(50)) { t->op = IOMMU_TEST_OP_MOCK_DOMAIN; }
		else {
			t->op = IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS;
			t->mock_domain_flags.dev_flags = chance(70) ? (uint32_t)below(4) : 1u << below(32);
		}
	} else if (kind < 35) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE; t->id = lpick(&l_stdev);
		switch (below(4)) {
		case 0: t->mock_domain_replace.pt_id = lpick(&l_ioas); break;
		case 1: t->mock_domain_replace.pt_id = lpick(&l_hwpt); break;
		default: t->mock_domain_replace.pt_id = lpick(&l_nested);
		}
	} else if (kind < 46) {
		struct iommu_hwpt_alloc *h = (void *)buf; cmd = IOMMU_HWPT_ALLOC; real = sizeof(*h);
		h->dev_id = lpick(&l_idev);
		int nested = chance(50);
		h->fault_id = lpick(&l_fault);
		if (nested) {
			// On a NEST_PARENT HWPT, with selftest data, perhaps a fault queue.
			h->pt_id = chance(85) ? lpick(&l_parent) : lpick(&l_hwpt);
			h->flags = chance(50) ? IOMMU_HWPT_FAULT_ID_VALID : 0;
			if (chance(8)) h->flags |= 1u << below(32);
			h->data_type = chance(92) ? IOMMU_HWPT_DATA_SELFTEST : (uint32_t)below(3);
			h->data_len = chance(85) ? sizeof(struct iommu_hwpt_selftest) : (uint32_t)below(12);
			h->data_uptr = chance(92) ? (uint64_t)(uintptr_t)AUX : 8;
			uint32_t iotlb = chance(90) ? IOMMU_TEST_IOTLB_DEFAULT : (uint32_t)rnd();
			memcpy(aux_in, &iotlb, 4);
		} else {
			h->pt_id = lpick(&l_ioas);
			h->flags = (chance(50) ? IOMMU_HWPT_ALLOC_NEST_PARENT : 0) |
				   (chance(30) ? IOMMU_HWPT_ALLOC_DIRTY_TRACKING : 0);
			if (chance(8)) h->flags |= 1u << below(32);
			if (chance(6)) {
				h->data_type = IOMMU_HWPT_DATA_SELFTEST;
				h->data_len = sizeof(struct iommu_hwpt_selftest);
				h->data_uptr = (uint64_t)(uintptr_t)AUX;
			}
		}
		if (chance(4)) h->__reserved = 1;
	} else if (kind < 50) {
		struct iommu_hw_info *w = (void *)buf; cmd = IOMMU_GET_HW_INFO; real = sizeof(*w);
		w->dev_id = lpick(&l_idev);
		static const uint32_t lens[] = {0, 4, 8, 12, 16, 64, 128, 4096, 0xffffffffu};
		w->data_len = lens[below(9)];
		w->data_uptr = chance(90) ? (uint64_t)(uintptr_t)AUX : (chance(50) ? 0 : 8);
		memset(aux_in, 0xa5, sizeof(aux_in));
		if (chance(4)) w->flags = 1;
		if (chance(4)) w->__reserved[below(3)] = 1;
	} else if (kind < 55) {
		struct iommu_hwpt_set_dirty_tracking *d = (void *)buf; cmd = IOMMU_HWPT_SET_DIRTY_TRACKING; real = sizeof(*d);
		d->hwpt_id = any_hwpt();
		d->flags = chance(90) ? (uint32_t)below(2) : 1u << below(32);
		if (chance(4)) d->__reserved = 1;
	} else if (kind < 63) {
		struct iommu_hwpt_get_dirty_bitmap *g = (void *)buf; cmd = IOMMU_HWPT_GET_DIRTY_BITMAP; real = sizeof(*g);
		g->hwpt_id = any_hwpt();
		g->flags = chance(85) ? (uint32_t)below(2) : 1u << below(32);
		g->iova = chance(85) ? (1ull << 24) + PG * below(64) : pick_iova();
		g->length = chance(85) ? PG * (1 + below(64)) : small_len();
		static const uint64_t ps[] = {4096, 4096, 8192, 2048, 0, 3000, 1ull << 21, 16384};
		g->page_size = ps[below(8)];
		g->data = (uint64_t)(uintptr_t)AUX + (chance(60) ? 0 : below(64));
		if (chance(3)) g->data = 8;
		memset(aux_in, chance(50) ? 0 : 0x11, sizeof(aux_in));
		if (chance(4)) g->__reserved = 1;
	} else if (kind < 68) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_DIRTY; t->id = any_hwpt();
		t->dirty.iova = (1ull << 24) + PG * below(64);
		t->dirty.length = PG * (1 + below(64));
		t->dirty.page_size = chance(80) ? PG : 2048;
		t->dirty.uptr = pick_va();
		if (chance(5)) t->dirty.flags = 1u << below(32);
	} else if (kind < 75) {
		struct iommu_hwpt_invalidate *v = (void *)buf; cmd = IOMMU_HWPT_INVALIDATE; real = sizeof(*v);
		v->hwpt_id = chance(80) ? lpick(&l_nested) : lpick(&l_hwpt);
		v->data_uptr = chance(92) ? (uint64_t)(uintptr_t)AUX : (chance(50) ? 0 : 8);
		v->data_type = chance(88) ? IOMMU_HWPT_INVALIDATE_DATA_SELFTEST : (chance(50) ? IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID : (uint32_t)below(3));
		static const uint32_t el[] = {8, 8, 8, 4, 12, 16, 0};
		v->entry_len = el[below(7)];
		v->entry_num = (uint32_t)below(5);
		for (int k = 0; k < 8; k++) {
			struct iommu_hwpt_invalidate_selftest *e = (void *)(aux_in + 8 * k);
			e->flags = chance(80) ? 0 : (chance(60) ? IOMMU_TEST_INVALIDATE_FLAG_ALL : 1u << below(32));
			e->iotlb_id = (uint32_t)below(6);
		}
		if (chance(4)) v->__reserved = 1;
	} else if (kind < 79) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_MD_CHECK_IOTLB; t->id = lpick(&l_nested);
		t->check_iotlb.id = (uint32_t)below(5);
		t->check_iotlb.iotlb = chance(50) ? IOMMU_TEST_IOTLB_DEFAULT : (chance(60) ? 0 : (uint32_t)rnd());
	} else if (kind < 83) {
		struct iommu_fault_alloc *f = (void *)buf; cmd = IOMMU_FAULT_QUEUE_ALLOC; real = sizeof(*f);
		if (chance(5)) f->flags = 1u << below(32);
		if (l_fd.n >= 16) { f->flags = 1; } // keep descriptors few
	} else if (kind < 89) {
		struct iommu_test_cmd *t = (void *)buf; cmd = IOMMU_TEST_CMD; real = sizeof(*t);
		t->op = IOMMU_TEST_OP_TRIGGER_IOPF;
		t->trigger_iopf.dev_id = lpick(&l_idev);
		t->trigger_iopf.pasid = chance(80) ? 0 : (uint32_t)below(8);
		t->trigger_iopf.grpid = (uint32_t)below(8);
		t->trigger_iopf.perm = (uint32_t)below(16);
		t->trigger_iopf.addr = PG * below(1024);
	} else if (kind < 95 && l_fd.n) {
		pseudo = 1; cmd = PSEUDO_READ; real = 8;
		pfd = l_fd.v[below(l_fd.n)];
		static const uint32_t rc[] = {0, 40, 80, 120, 39, 41, 8};
		pcount = chance(80) ? rc[below(4)] : rc[4 + below(3)];
		memset(aux_in, 0x5a, sizeof(aux_in));
	} else if (l_fd.n) {
		pseudo = 1; cmd = PSEUDO_WRITE; real = 8;
		pfd = l_fd.v[below(l_fd.n)];
		pcount = chance(85) ? 8 * (uint32_t)(1 + below(4)) : (uint32_t)below(12);
		for (int k = 0; k < 16; k++) {
			struct iommu_hwpt_page_response *r = (void *)(aux_in + 8 * k);
			r->cookie = chance(85) ? (uint32_t)(1 + below(4)) : (uint32_t)rnd();
			r->code = chance(85) ? (uint32_t)below(2) : (uint32_t)below(4);
		}
	} else {
		struct iommu_fault_alloc *f = (void *)buf; cmd = IOMMU_FAULT_QUEUE_ALLOC; real = sizeof(*f);
	}
	size_t rec;
	if (pseudo) {
		memcpy(buf, &pfd, 4); memcpy(buf + 4, &pcount, 4);
		rec = real + 16;
	} else {
		rec = chance(85) ? (memcpy(buf, &(uint32_t){(uint32_t)real}, 4), real + 16) : mutate(buf, real);
	}
	memcpy(AUX, aux_in, sizeof(aux_in));
	memcpy(in_copy, buf, rec);
	errno = 0;
	long ret;
	if (cmd == PSEUDO_READ) {
		// (A fault queue read does not block: an empty queue reads 0 bytes.)
		ret = read((int)pfd, AUX, pcount);
	} else if (cmd == PSEUDO_WRITE) {
		ret = write((int)pfd, AUX, pcount);
	} else {
		ret = ioctl(fd, cmd, buf);
	}
	int err = ret < 0 ? errno : 0;
	printf("REC {\"seed\":%d,\"step\":%d,\"cmd\":\"0x%lx\",", seed, i, cmd);
	hex("in", in_copy, rec); printf(","); hex("aux_in", aux_in, sizeof(aux_in));
	printf(",\"ret\":%ld,\"errno\":%d,", ret, err);
	hex("out", buf, rec); printf(","); hex("aux_out", AUX, sizeof(aux_in));
	printf("}\n");
	if (ret < 0 || pseudo) return;
	if (cmd == IOMMU_IOAS_ALLOC) ladd(&l_ioas, ((struct iommu_ioas_alloc *)buf)->out_ioas_id);
	if (cmd == IOMMU_HWPT_ALLOC) {
		struct iommu_hwpt_alloc *h = (void *)buf;
		ladd(h->data_type == IOMMU_HWPT_DATA_NONE ? &l_hwpt : &l_nested, h->out_hwpt_id);
		if (h->data_type == IOMMU_HWPT_DATA_NONE && (h->flags & IOMMU_HWPT_ALLOC_NEST_PARENT))
			ladd(&l_parent, h->out_hwpt_id);
	}
	if (cmd == IOMMU_FAULT_QUEUE_ALLOC) {
		ladd(&l_fault, ((struct iommu_fault_alloc *)buf)->out_fault_id);
		ladd(&l_fd, ((struct iommu_fault_alloc *)buf)->out_fault_fd);
	}
	if (cmd == IOMMU_TEST_CMD) {
		struct iommu_test_cmd *t = (void *)buf;
		if (t->op == IOMMU_TEST_OP_MOCK_DOMAIN || t->op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS) {
			ladd(&l_stdev, t->mock_domain.out_stdev_id);
			ladd(&l_hwpt, t->mock_domain.out_hwpt_id);
			ladd(&l_idev, t->mock_domain.out_idev_id);
		}
	}
}

int main(int argc, char **argv) {
	int first = argc > 1 ? atoi(argv[1]) : 1, count = argc > 2 ? atoi(argv[2]) : 10;
	int steps = argc > 3 ? atoi(argv[3]) : 300;
	int mix = argc > 4 ? atoi(argv[4]) : 1;
	if (mmap(ARENA, ARENA_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != ARENA ||
	    mmap(AUX, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != AUX) {
		perror("mmap fixed"); return 1;
	}
	for (uint64_t off = 0; off < ARENA_LEN; off += PG) ARENA[off] = (uint8_t)(off >> 12);
	for (int seed = first; seed < first + count; seed++) {
		int fd = open("/dev/iommu", O_RDWR);
		if (fd < 0) { perror("/dev/iommu"); return 1; }
		rs = 0x9e3779b97f4a7c15ull * (uint64_t)seed + 1;
		nids = niovas = 0;
		l_ioas.n = l_idev.n = l_stdev.n = l_hwpt.n = l_nested.n = l_fault.n = l_fd.n = l_parent.n = 0;
		for (int i = 0; i < steps; i++) {
			if (mix == 2) step2(fd, seed, i); else step(fd, seed, i);
		}
		for (int k = 0; k < l_fd.n; k++) close((int)l_fd.v[k]);
		close(fd);
	}
	printf("REC done\n");
	return 0;
}
