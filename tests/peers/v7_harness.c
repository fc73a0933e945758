/*
 * ukvmi-v7-harness: checks, with the real libkvmi, that a kvmi-v7 server
 * without EPT views, SPP, #VE or GFN allocation refuses each of those
 * commands with -KVM_EOPNOTSUPP and that the connection stays usable.
 *
 * Usage: ukvmi-v7-harness [--timeout SECONDS] SOCKET_PATH
 *
 * It listens at SOCKET_PATH with libkvmi (as hookguest-libkvmi does, and
 * answering the handshake with a zero cookie), waits for a VM to connect
 * (30 s by default), then, for each v7-only call:
 *
 *     NAME: rc=<rc> errno=<errno> (<strerror>)
 *     usable: vcpus=N
 *
 * where the second line follows a check that the connection still works
 * (GET_GUEST_INFO, then READ_PHYSICAL of guest page 0). Calls are made both
 * directly and through KVMI_CHECK_COMMAND for the command's id.
 *
 * Exit status: 0 when every v7-only call failed with errno EOPNOTSUPP and
 * every check of the connection passed; 1 otherwise, with a "FAIL: " line
 * for each problem (the checks stop at the first one that leaves the
 * connection unusable, and after 120 s in all); 2 for bad usage; 3 when no
 * VM connected in time.
 *
 * Built by scripts/peers against the libkvmi it builds (headers from the
 * install prefix, -lkvmi) into target/peers/bin/ukvmi-v7-harness.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libkvmi.h>

/* Exported by libkvmi (src/version.ld) but not declared in libkvmi.h. */
int kvmi_get_next_available_gfn(void *dom, unsigned long long *gfn);

#define DEFAULT_TIMEOUT_S 30
/* The whole run after the VM connected, in case the server stops answering. */
#define CHECKS_TIMEOUT_S 120
#define PAGE_SIZE 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t connected = PTHREAD_COND_INITIALIZER;
static void *the_dom;
static char vm_name[65];

static int failures;

static void watchdog(int sig)
{
    static const char msg[] = "FAIL: timeout: the checks took longer than 120 s; the server stopped answering?\n";

    (void)sig;
    if (write(STDOUT_FILENO, msg, sizeof(msg) - 1) < 0) {
        /* nothing else to do */
    }
    _exit(1);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("FAIL: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    failures++;
}

static void log_cb(kvmi_log_level level, const char *s, void *ctx)
{
    static const char *names[] = { "debug", "info", "warning", "error" };

    (void)ctx;
    fprintf(stderr, "libkvmi %s: %s\n",
            (unsigned)level < sizeof(names) / sizeof(names[0]) ? names[level] : "?", s);
}

static int handshake_cb(const struct kvmi_qemu2introspector *qemu, struct kvmi_introspector2qemu *intro,
                        void *ctx)
{
    (void)ctx;
    /* libkvmi zeroed *intro and set its struct_size: a zero cookie. */
    (void)intro;
    pthread_mutex_lock(&lock);
    snprintf(vm_name, sizeof(vm_name), "%s", qemu->name);
    pthread_mutex_unlock(&lock);
    return 0;
}

static int accept_cb(void *dom, unsigned char (*uuid)[16], void *ctx)
{
    (void)uuid;
    (void)ctx;
    pthread_mutex_lock(&lock);
    if (the_dom) {
        /* One VM at a time: refuse (libkvmi closes) any later connection. */
        pthread_mutex_unlock(&lock);
        fprintf(stderr, "ukvmi-v7-harness: refusing a second connection\n");
        return -1;
    }
    the_dom = dom;
    pthread_cond_signal(&connected);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* Checks that the connection answers ordinary commands; false if not. */
static bool check_usable(void *dom, const char *after)
{
    static unsigned char page[PAGE_SIZE];
    unsigned int vcpus = 0;
    int rc;

    errno = 0;
    rc = kvmi_get_vcpu_count(dom, &vcpus);
    if (rc) {
        int e = errno;
        fail("connection not usable after %s: kvmi_get_vcpu_count rc=%d errno=%d (%s)", after, rc, e,
             strerror(e));
        return false;
    }
    if (vcpus == 0) {
        fail("connection not usable after %s: kvmi_get_vcpu_count reports 0 vCPUs", after);
        return false;
    }
    errno = 0;
    rc = kvmi_read_physical(dom, 0, page, sizeof(page));
    if (rc) {
        int e = errno;
        fail("connection not usable after %s: kvmi_read_physical(gpa 0, %zu) rc=%d errno=%d (%s)", after,
             sizeof(page), rc, e, strerror(e));
        return false;
    }
    printf("usable: vcpus=%u\n", vcpus);
    fflush(stdout);
    return true;
}

static bool expect_refused(void *dom, const char *name, int rc, int err)
{
    printf("%s: rc=%d errno=%d (%s)\n", name, rc, err, strerror(err));
    fflush(stdout);
    if (rc == 0)
        fail("%s succeeded; a server without this feature must refuse it with -KVM_EOPNOTSUPP", name);
    else if (err != EOPNOTSUPP)
        fail("%s failed with errno %d (%s), expected %d (%s)", name, err, strerror(err), EOPNOTSUPP,
             strerror(EOPNOTSUPP));
    return check_usable(dom, name);
}

/*
 * CALL is evaluated with errno cleared; its rc and errno are checked. Once
 * the connection is broken the remaining calls would only time out (15 s
 * each in libkvmi), so the checks stop there.
 */
#define REFUSED(dom, label, call)                                                                          \
    do {                                                                                                   \
        int rc_;                                                                                           \
        errno = 0;                                                                                         \
        rc_ = (call);                                                                                      \
        if (!expect_refused((dom), (label), rc_, errno))                                                   \
            return;                                                                                        \
    } while (0)

static void run_checks(void *dom)
{
    /* The v7 commands a server without these features refuses. */
    static const struct {
        int id;
        const char *name;
    } refused_ids[] = {
        { KVMI_CONTROL_VE, "KVMI_CONTROL_VE" },
        { KVMI_GET_PAGE_ACCESS, "KVMI_GET_PAGE_ACCESS" },
        { KVMI_GET_MAP_TOKEN, "KVMI_GET_MAP_TOKEN" },
        { KVMI_CONTROL_SPP, "KVMI_CONTROL_SPP" },
        { KVMI_GET_PAGE_WRITE_BITMAP, "KVMI_GET_PAGE_WRITE_BITMAP" },
        { KVMI_SET_PAGE_WRITE_BITMAP, "KVMI_SET_PAGE_WRITE_BITMAP" },
        { KVMI_SET_VE_INFO_PAGE, "KVMI_SET_VE_INFO_PAGE" },
        { KVMI_GET_NEXT_AVAILABLE_GFN, "KVMI_GET_NEXT_AVAILABLE_GFN" },
        { KVMI_SWITCH_EPT_VIEW, "KVMI_SWITCH_EPT_VIEW" },
        { KVMI_DISABLE_VE, "KVMI_DISABLE_VE" },
        { KVMI_CONTROL_EPT_VIEW, "KVMI_CONTROL_EPT_VIEW" },
        { KVMI_QUERY_PHYSICAL, "KVMI_QUERY_PHYSICAL" },
        { KVMI_VCPU_ALLOC_GFN, "KVMI_VCPU_ALLOC_GFN" },
        { KVMI_VCPU_FREE_GFN, "KVMI_VCPU_FREE_GFN" },
        { KVMI_CREATE_EPT_VIEW, "KVMI_CREATE_EPT_VIEW" },
        { KVMI_DESTROY_EPT_VIEW, "KVMI_DESTROY_EPT_VIEW" },
        { KVMI_VCPU_CHANGE_GFN, "KVMI_VCPU_CHANGE_GFN" },
    };
    unsigned short view = 0;
    unsigned long long gfn = 0;
    unsigned long long gpa = 0;
    unsigned char access = 7; /* rwx: harmless even if wrongly applied to view 0 */
    __u64 spp_gpa = 0;
    __u32 spp_bitmap = 0xffffffffu;
    char label[96];
    size_t k;

    if (!check_usable(dom, "the handshake"))
        return;

    /* EPT views */
    REFUSED(dom, "kvmi_create_ept_view", kvmi_create_ept_view(dom, &view));
    REFUSED(dom, "kvmi_destroy_ept_view(view 1)", kvmi_destroy_ept_view(dom, 1));
    REFUSED(dom, "kvmi_switch_ept_view(vcpu 0, view 1)", kvmi_switch_ept_view(dom, 0, 1));
    REFUSED(dom, "kvmi_control_ept_view(vcpu 0, view 1)", kvmi_control_ept_view(dom, 0, 1, true));
    REFUSED(dom, "kvmi_set_page_access(view 1)", kvmi_set_page_access(dom, &gpa, &access, 1, 1));

    /* GFN allocation */
    REFUSED(dom, "kvmi_get_next_available_gfn", kvmi_get_next_available_gfn(dom, &gfn));
    REFUSED(dom, "kvmi_alloc_gfn", kvmi_alloc_gfn(dom, 0));
    REFUSED(dom, "kvmi_free_gfn", kvmi_free_gfn(dom, 0));
    REFUSED(dom, "kvmi_change_gfn(vcpu 0, view 0)", kvmi_change_gfn(dom, 0, 0, 0, 0));

    /* SPP */
    REFUSED(dom, "kvmi_set_page_write_bitmap", kvmi_set_page_write_bitmap(dom, &spp_gpa, &spp_bitmap, 1));

    /* #VE */
    REFUSED(dom, "kvmi_set_ve_info_page(vcpu 0)", kvmi_set_ve_info_page(dom, 0, 0));
    REFUSED(dom, "kvmi_disable_ve(vcpu 0)", kvmi_disable_ve(dom, 0));

    /* KVMI_CHECK_COMMAND must report the same for each of these ids. */
    for (k = 0; k < sizeof(refused_ids) / sizeof(refused_ids[0]); k++) {
        snprintf(label, sizeof(label), "kvmi_check_command(%s=%d)", refused_ids[k].name, refused_ids[k].id);
        REFUSED(dom, label, kvmi_check_command(dom, refused_ids[k].id));
    }
}

static void usage(FILE *to)
{
    fprintf(to, "usage: ukvmi-v7-harness [--timeout SECONDS] SOCKET_PATH\n");
}

int main(int argc, char **argv)
{
    long timeout_s = DEFAULT_TIMEOUT_S;
    const char *path = NULL;
    struct timespec deadline;
    void *ctx;
    void *dom;
    int err = 0;
    int i;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
            char *end = NULL;
            timeout_s = strtol(argv[++i], &end, 10);
            if (!end || *end || timeout_s <= 0) {
                fprintf(stderr, "ukvmi-v7-harness: bad --timeout %s\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!path && argv[i][0] != '-') {
            path = argv[i];
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }

    setvbuf(stdout, NULL, _IOLBF, 0);
    kvmi_set_log_cb(log_cb, NULL);

    ctx = kvmi_init_unix_socket(path, accept_cb, handshake_cb, NULL);
    if (!ctx) {
        int e = errno;
        printf("FAIL: cannot listen at %s: errno=%d (%s)\n", path, e, strerror(e));
        return 1;
    }
    printf("listening at %s; waiting up to %ld s for a VM\n", path, timeout_s);

    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_s;
    pthread_mutex_lock(&lock);
    while (!the_dom && err != ETIMEDOUT)
        err = pthread_cond_timedwait(&connected, &lock, &deadline);
    dom = the_dom;
    pthread_mutex_unlock(&lock);

    if (!dom) {
        printf("FAIL: timeout: no VM connected to %s within %ld s\n", path, timeout_s);
        kvmi_uninit(ctx);
        unlink(path);
        return 3;
    }

    pthread_mutex_lock(&lock);
    printf("connected: VM '%s'\n", vm_name);
    pthread_mutex_unlock(&lock);

    signal(SIGALRM, watchdog);
    alarm(CHECKS_TIMEOUT_S);
    run_checks(dom);
    alarm(0);

    /* Stop accepting, then drop the VM's connection. */
    kvmi_uninit(ctx);
    unlink(path);
    kvmi_domain_close(dom, true);

    if (failures) {
        printf("result: FAILED (%d problem%s)\n", failures, failures == 1 ? "" : "s");
        return 1;
    }
    printf("result: ok: every v7-only call was refused with EOPNOTSUPP and the connection stayed usable\n");
    return 0;
}
