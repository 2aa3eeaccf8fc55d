/* LD_PRELOAD shim that gives wrk (or any OpenSSL client) client certificates, and optionally no TLS
 * session resumption, so that every new connection is a full handshake with a client certificate.
 *
 *   KCD_SHIM_CERTS=<file>   lines "cert.pem key.pem"; the n-th SSL object made gets pair n mod count
 *                           (wrk makes one SSL object per connection slot and keeps it across reconnects)
 *   KCD_SHIM_NO_RESUME=1    forget the session before each reconnect (SSL_clear keeps it otherwise)
 *
 * Built by bench/run.py with: gcc -shared -fPIC -O2 -o certshim.so certshim.c -ldl -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static X509 **certs;
static EVP_PKEY **keys;
static int count;
static unsigned next_pair;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void *load_pem(const char *path, int is_key) {
    FILE *f = fopen(path, "r");
    void *obj = NULL;
    if (f == NULL) {
        fprintf(stderr, "certshim: cannot open %s\n", path);
        exit(2);
    }
    obj = is_key ? (void *)PEM_read_PrivateKey(f, NULL, NULL, NULL) : (void *)PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (obj == NULL) {
        fprintf(stderr, "certshim: cannot read %s\n", path);
        exit(2);
    }
    return obj;
}

static void load(void) {
    const char *list = getenv("KCD_SHIM_CERTS");
    char cert[4096], key[4096];
    int size = 0;
    FILE *f;
    if (list == NULL || (f = fopen(list, "r")) == NULL)
        return;
    while (fscanf(f, "%4095s %4095s", cert, key) == 2) {
        if (count == size) {
            size = size ? 2 * size : 64;
            certs = realloc(certs, size * sizeof *certs);
            keys = realloc(keys, size * sizeof *keys);
        }
        certs[count] = load_pem(cert, 0);
        keys[count] = load_pem(key, 1);
        count++;
    }
    fclose(f);
}

SSL *SSL_new(SSL_CTX *ctx) {
    static SSL *(*real)(SSL_CTX *);
    SSL *ssl;
    if (real == NULL)
        real = (SSL * (*)(SSL_CTX *)) dlsym(RTLD_NEXT, "SSL_new");
    pthread_once(&once, load);
    ssl = real(ctx);
    if (ssl != NULL && count > 0) {
        unsigned i = __atomic_fetch_add(&next_pair, 1, __ATOMIC_RELAXED) % (unsigned)count;
        SSL_use_certificate(ssl, certs[i]);
        SSL_use_PrivateKey(ssl, keys[i]);
    }
    return ssl;
}

int SSL_clear(SSL *ssl) {
    static int (*real)(SSL *);
    if (real == NULL)
        real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    if (getenv("KCD_SHIM_NO_RESUME") != NULL)
        SSL_set_session(ssl, NULL);
    return real(ssl);
}
