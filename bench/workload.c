/* Benchmark workload for `cargo bench --bench dump`.
 *
 * Maps SIZE MiB of private anonymous memory (argv[1]; default 1024 for a
 * 64-bit build, 512 for a 32-bit one), writes non-zero data to every page
 * (so every page exists and none is the shared zero page), prints "READY"
 * on stdout and then sleeps forever. Single-threaded, no pipes: cryopod
 * can dump it as is.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    unsigned long mib = sizeof(void *) == 8 ? 1024 : 512;
    if (argc > 1)
        mib = strtoul(argv[1], NULL, 10);
    if (mib == 0)
        return 2;
    size_t len = (size_t)mib << 20;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        static const char msg[] = "workload: mmap failed\n";
        write(2, msg, sizeof msg - 1);
        return 1;
    }
    long page = sysconf(_SC_PAGESIZE);
    /* Every word of every page non-zero and different from page to page. */
    for (size_t off = 0; off < len; off += (size_t)page) {
        uint32_t *p = (uint32_t *)(mem + off);
        uint32_t v = (uint32_t)(off / (size_t)page) * 2654435761u | 1u;
        for (size_t i = 0; i < (size_t)page / sizeof *p; i++)
            p[i] = v + (uint32_t)i;
    }
    static const char ready[] = "READY\n";
    if (write(1, ready, sizeof ready - 1) != (ssize_t)(sizeof ready - 1))
        return 1;
    for (;;) {
        struct timespec ts = { 3600, 0 };
        nanosleep(&ts, NULL);
    }
}
