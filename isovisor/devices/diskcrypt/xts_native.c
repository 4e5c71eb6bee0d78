/* AES-XTS-256 over whole 512-byte sectors (IEEE 1619, dm-crypt's aes-xts-plain64: the
 * tweak of a sector is its number as a 128-bit little-endian integer), for encrypted
 * virtio-blk disks (isovisor/devices/diskcrypt/xts.py loads this with ctypes).
 *
 * The AES is OpenSSL's (libcrypto, AES-NI where the CPU has it), through EVP AES-256-ECB
 * contexts made once per disk; only the XTS composition is here, in batches of BATCH
 * sectors, so a request costs a few EVP calls instead of one per 512-byte sector
 * (resetting the IV of an EVP XTS context costs more than encrypting the sector):
 *
 *   E = AES-ECB_K2(sector numbers)                   one call for the batch's tweaks
 *   T[s][j] = E[s] * alpha^j in GF(2^128), j < 32    doubling with 64-bit words
 *   C = AES-ECB_K1(P xor T) xor T                    P = AES-ECB^-1_K1(C xor T) xor T
 *
 * Inputs are checked by the Python caller (whole sectors, same length, 64-bit sector
 * numbers, the buffers' own lengths) and again here. `in` is read exactly once, and `out`
 * is written exactly once with the result: the intermediate values (the tweaks, P xor T)
 * stay in this function's stack buffers, which are wiped before it returns, so a guest
 * whose memory is `in` or `out` sees neither. `in` and `out` may be the same buffer.
 * Not reentrant for one handle across threads (the OpenSSL contexts are shared); each
 * disk's I/O thread owns its handle, and the calls come through a ctypes PyDLL, under
 * the GIL. isx_read_decrypt adds the read path's page-cache case (one preadv2 with
 * RWF_NOWAIT, then isx_crypt) so that it is one call too.
 */
#define _GNU_SOURCE /* explicit_bzero, preadv2, RWF_NOWAIT */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define SECTOR 512
#define BLOCK 16
#define BLOCKS_PER_SECTOR (SECTOR / BLOCK)
#define BATCH 16 /* sectors per pass: 8 KiB of data and 8 KiB of tweaks, in L1 */

enum { ISX_OK = 0, ISX_EINVAL = -1, ISX_ECRYPTO = -2, ISX_EAGAIN = -3 };

struct isx {
    EVP_CIPHER_CTX *tweak; /* AES-256-ECB encrypt, K2 */
    EVP_CIPHER_CTX *enc;   /* AES-256-ECB encrypt, K1 */
    EVP_CIPHER_CTX *dec;   /* AES-256-ECB decrypt, K1 */
};

/* Frees a handle; EVP_CIPHER_CTX_free wipes the key schedules. NULL is ignored. */
void isx_free(struct isx *h) {
    if (!h)
        return;
    EVP_CIPHER_CTX_free(h->tweak);
    EVP_CIPHER_CTX_free(h->enc);
    EVP_CIPHER_CTX_free(h->dec);
    OPENSSL_free(h);
}

static EVP_CIPHER_CTX *ecb_context(const unsigned char *key, int encrypt) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c)
        return NULL;
    if (EVP_CipherInit_ex(c, EVP_aes_256_ecb(), NULL, key, NULL, encrypt) != 1 ||
        EVP_CIPHER_CTX_set_padding(c, 0) != 1) {
        EVP_CIPHER_CTX_free(c);
        return NULL;
    }
    return c;
}

/* A handle for a 64-byte XTS key (K1 = key[0..31], K2 = key[32..63]); NULL on failure.
 * The caller has checked that the halves differ. */
struct isx *isx_new(const unsigned char *key) {
    struct isx *h;
    if (!key)
        return NULL;
    h = OPENSSL_zalloc(sizeof *h);
    if (!h)
        return NULL;
    h->tweak = ecb_context(key + 32, 1);
    h->enc = ecb_context(key, 1);
    h->dec = ecb_context(key, 0);
    if (!h->tweak || !h->enc || !h->dec) {
        isx_free(h);
        return NULL;
    }
    return h;
}

/* dst = a xor t over nb bytes (nb a multiple of 16); unaligned access through memcpy. */
static void xor_tweaks(unsigned char *dst, const unsigned char *a, const uint64_t *t,
                       size_t nb) {
    for (size_t i = 0; i < nb; i += 8) {
        uint64_t v;
        memcpy(&v, a + i, 8);
        v ^= t[i / 8];
        memcpy(dst + i, &v, 8);
    }
}

/* Encrypts (encrypt != 0) or decrypts `len` bytes of whole sectors, the first being
 * `sector`, from `in` to `out`. Returns ISX_OK, ISX_EINVAL (bad arguments: nothing was
 * written) or ISX_ECRYPTO (OpenSSL failed: `out` is incomplete and must not be used). */
int isx_crypt(struct isx *h, int encrypt, const unsigned char *in, unsigned char *out,
              size_t len, uint64_t sector) {
    uint64_t t[BATCH * BLOCKS_PER_SECTOR * 2];
    unsigned char x[BATCH * SECTOR];
    unsigned char e[BATCH * BLOCK];
    EVP_CIPHER_CTX *ctx;
    size_t used = len / SECTOR < BATCH ? len / SECTOR : BATCH;
    int n, rc = ISX_OK;

    if (!h || !in || !out || len % SECTOR)
        return ISX_EINVAL;
    if (len && len / SECTOR - 1 > UINT64_MAX - sector)
        return ISX_EINVAL; /* the last sector number would wrap */
    ctx = encrypt ? h->enc : h->dec;
    memset(e, 0, sizeof e);
    while (len) {
        size_t ns = len / SECTOR < BATCH ? len / SECTOR : BATCH;
        size_t nb = ns * SECTOR;
        for (size_t s = 0; s < ns; s++) {
            uint64_t v = sector + s;
            for (int i = 0; i < 8; i++) /* little-endian whatever the host */
                e[s * BLOCK + i] = (unsigned char)(v >> (8 * i));
            memset(e + s * BLOCK + 8, 0, 8);
        }
        if (EVP_CipherUpdate(h->tweak, e, &n, e, (int)(ns * BLOCK)) != 1 ||
            n != (int)(ns * BLOCK)) {
            rc = ISX_ECRYPTO;
            break;
        }
        for (size_t s = 0; s < ns; s++) {
            uint64_t lo = 0, hi = 0, *ts = t + s * BLOCKS_PER_SECTOR * 2;
            for (int i = 7; i >= 0; i--) {
                lo = (lo << 8) | e[s * BLOCK + i];
                hi = (hi << 8) | e[s * BLOCK + 8 + i];
            }
            ts[0] = lo;
            ts[1] = hi;
            for (int j = 1; j < BLOCKS_PER_SECTOR; j++) {
                /* E * alpha^j: a 128-bit shift left by j; the j bits shifted out, o,
                 * come back as o * (x^7 + x^2 + x + 1) (x^128 = that, mod the XTS
                 * polynomial); o < 2^31, so o * 0x87 fits in 64 bits: no second fold.
                 * Each j from E directly (no chain), no branch on tweak bits. */
                uint64_t o = hi >> (64 - j);
                ts[2 * j] = (lo << j) ^ o ^ (o << 1) ^ (o << 2) ^ (o << 7);
                ts[2 * j + 1] = (hi << j) | (lo >> (64 - j));
            }
        }
        /* t holds little-endian 64-bit words: on a big-endian host they would need a
         * byte swap here; isovisor runs on x86-64 (KVM), which the build asserts. */
        xor_tweaks(x, in, t, nb);
        if (EVP_CipherUpdate(ctx, x, &n, x, (int)nb) != 1 || n != (int)nb) {
            rc = ISX_ECRYPTO;
            break;
        }
        xor_tweaks(out, x, t, nb);
        in += nb;
        out += nb;
        len -= nb;
        sector += ns;
    }
    /* explicit_bzero (glibc): a memset the compiler keeps, over what was used */
    explicit_bzero(t, used * BLOCKS_PER_SECTOR * 2 * sizeof t[0]);
    explicit_bzero(x, used * SECTOR);
    explicit_bzero(e, sizeof e);
    return rc;
}

/* The read path's fast case: reads `len` bytes (whole sectors) of ciphertext from `fd` at
 * byte `offset` into `buf` (the caller's private buffer, `len` bytes) with one
 * preadv2(RWF_NOWAIT), which never waits for the disk, and decrypts them into `out`.
 * Returns ISX_OK; ISX_EAGAIN when the bytes were not all in the page cache, or the read
 * failed or fell short in any way (`out` untouched: the caller then reads the usual way,
 * off the GIL, and calls isx_crypt); ISX_EINVAL (bad arguments); ISX_ECRYPTO. */
int isx_read_decrypt(struct isx *h, int fd, uint64_t offset, unsigned char *buf,
                     unsigned char *out, size_t len) {
    struct iovec iov;
    ssize_t r;
    if (!h || !buf || !out || fd < 0 || len % SECTOR || offset % SECTOR ||
        len > (size_t)INT64_MAX || offset > (uint64_t)INT64_MAX - len)
        return ISX_EINVAL; /* off_t is signed: offset + len must fit */
    if (!len)
        return ISX_OK;
    iov.iov_base = buf;
    iov.iov_len = len;
    do
        r = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    while (r < 0 && errno == EINTR);
    if (r < 0 || (size_t)r != len)
        return ISX_EAGAIN;
    return isx_crypt(h, 0, buf, out, len, offset / SECTOR);
}

#if !defined(__x86_64__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "xts_native.c assumes a little-endian x86-64 host (the tweak words)"
#endif
