/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of page data.
 *
 * The wire protocol checksums every page batch on both sides, so this runs
 * over every byte a migration moves.  x86-64 (SSE4.2) and arm64 (the ARMv8
 * CRC32 extension) compute it with one instruction per 8 bytes; other CPUs
 * (or those without the extension) use a table-driven loop.  The choice is
 * made once, at load, from what the CPU reports, so one build runs
 * everywhere.  The software loop stays callable on its own so that tests
 * can check both against each other.
 *
 * The value follows the usual convention (initial ~0, final ~0), and
 * chaining works: crc(a + b) == mig_crc32c(crc(a), b).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "migrator_native.h"

#define POLY 0x82F63B78u

/* Slicing by 8: table[k][b] is the CRC of byte b followed by k zero bytes. */
static uint32_t table[8][256];

static void make_tables(void)
{
	for (uint32_t b = 0; b < 256; b++) {
		uint32_t c = b;
		for (int i = 0; i < 8; i++)
			c = (c >> 1) ^ (POLY & (0u - (c & 1)));
		table[0][b] = c;
	}
	for (uint32_t b = 0; b < 256; b++)
		for (int k = 1; k < 8; k++)
			table[k][b] = (table[k - 1][b] >> 8) ^
				      table[0][table[k - 1][b] & 0xff];
}

static uint64_t load64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof v); /* unaligned-safe; compiles to one load */
	return v;
}

static uint32_t crc_sw(uint32_t c, const unsigned char *p, size_t n)
{
	while (n && ((uintptr_t)p & 7)) {
		c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
		n--;
	}
	for (; n >= 8; n -= 8, p += 8) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
		uint64_t v = load64(p) ^ c;
#else
		uint64_t v = __builtin_bswap64(load64(p)) ^ c;
#endif
		c = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^
		    table[5][(v >> 16) & 0xff] ^ table[4][(v >> 24) & 0xff] ^
		    table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
		    table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
	}
	while (n--)
		c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
	return c;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t c, const unsigned char *p, size_t n)
{
	uint64_t c64;

	while (n && ((uintptr_t)p & 7)) {
		c = _mm_crc32_u8(c, *p++);
		n--;
	}
	c64 = c;
	for (; n >= 8; n -= 8, p += 8)
		c64 = _mm_crc32_u64(c64, load64(p));
	c = (uint32_t)c64;
	while (n--)
		c = _mm_crc32_u8(c, *p++);
	return c;
}

static int have_hw(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("sse4.2");
}
#define HW_NAME "sse4.2"

#elif defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>

#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif

__attribute__((target("+crc")))
static uint32_t crc_hw(uint32_t c, const unsigned char *p, size_t n)
{
	while (n && ((uintptr_t)p & 7)) {
		c = __crc32cb(c, *p++);
		n--;
	}
	for (; n >= 8; n -= 8, p += 8)
		c = __crc32cd(c, load64(p));
	while (n--)
		c = __crc32cb(c, *p++);
	return c;
}

static int have_hw(void)
{
	return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#define HW_NAME "armv8-crc32"

#else
#define crc_hw crc_sw
static int have_hw(void)
{
	return 0;
}
#define HW_NAME "none"
#endif

static uint32_t (*crc_impl)(uint32_t, const unsigned char *, size_t) = crc_sw;
static const char *impl_name = "table";

__attribute__((constructor))
static void crc32c_init(void)
{
	make_tables();
	if (have_hw()) {
		crc_impl = crc_hw;
		impl_name = HW_NAME;
	}
}

uint32_t mig_crc32c(uint32_t crc, const void *data, size_t n)
{
	return ~crc_impl(~crc, data, n);
}

uint32_t mig_crc32c_table(uint32_t crc, const void *data, size_t n)
{
	return ~crc_sw(~crc, data, n);
}

const char *mig_crc32c_impl(void)
{
	return impl_name;
}
