/*
 * A libvirt stand-in for running LibVMI's KVM driver against ukvmi.
 *
 * LibVMI's KVM driver dlopen()s "libvirt.so" (falling back to
 * "libvirt.so.0") and "libvirt-qemu.so" (falling back to
 * "libvirt-qemu.so.0"), resolves thirteen symbols with dlsym() and gives up
 * unless every one of them is found. It only uses libvirt to turn the name
 * of a running VM into a domain id and back; the introspection itself goes
 * over the KVMI socket. There is no libvirtd in the tests, so this library
 * answers those calls for exactly one running VM, with no daemon behind it.
 *
 * scripts/peers compiles this file into target/peers/stub/libvirt.so.0 and
 * links libvirt.so, libvirt-qemu.so and libvirt-qemu.so.0 to it; a test puts
 * that directory first on LD_LIBRARY_PATH.
 *
 * The VM (environment, read at each call):
 *   UKVMI_STUB_DOMAIN      its name. When set, virDomainLookupByName finds
 *                          only this name. When unset, any name is found and
 *                          becomes the VM's name (the last one looked up; the
 *                          initial name is "ukvmi").
 *   UKVMI_STUB_DOMAIN_ID   its domain id (default 1; must be > 0).
 *   UKVMI_STUB_VCPUS       vCPU count in virDomainGetInfo (default 1).
 *   UKVMI_STUB_MEMORY_KIB  memory in virDomainGetInfo (default 65536).
 *   UKVMI_STUB_DEBUG       when set to a non-empty value other than "0",
 *                          every call is traced to stderr as
 *                          "libvirt-stub: ...".
 *
 * This is the project's own code, written from libvirt's public API
 * (the declarations in <libvirt/libvirt.h> and <libvirt/libvirt-qemu.h>).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>

#define STUB_EXPORT __attribute__((visibility("default")))

/* The opaque handles of the public API, given a body here. */
struct _virConnect {
    unsigned int magic;
    char *uri;
};

struct _virDomain {
    unsigned int magic;
    int id;
    char *name;
};

#define CONN_MAGIC 0x75636f6eu   /* "ucon" */
#define DOM_MAGIC  0x75646f6du   /* "udom" */
#define DEAD_MAGIC 0xdeadbeefu

/*
 * LibVMI dlsym()s this variable and passes its *address* as the auth
 * argument of virConnectOpenAuth. The stub needs no credentials, so it is
 * only there to be found.
 */
STUB_EXPORT virConnectAuthPtr virConnectAuthPtrDefault = NULL;

static pthread_mutex_t name_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_name[256] = "ukvmi";

static int debug_on(void)
{
    const char *v = getenv("UKVMI_STUB_DEBUG");
    return v && *v && strcmp(v, "0") != 0;
}

static void trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void trace(const char *fmt, ...)
{
    va_list ap;

    if (!debug_on())
        return;
    va_start(ap, fmt);
    fputs("libvirt-stub: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static unsigned long env_ulong(const char *var, unsigned long fallback)
{
    const char *v = getenv(var);
    char *end = NULL;
    unsigned long n;

    if (!v || !*v)
        return fallback;
    errno = 0;
    n = strtoul(v, &end, 0);
    if (errno || !end || *end)
        return fallback;
    return n;
}

static int vm_id(void)
{
    unsigned long id = env_ulong("UKVMI_STUB_DOMAIN_ID", 1);

    return (id > 0 && id < 0x7fffffff) ? (int)id : 1;
}

/* The VM's current name, copied into buf. */
static void vm_name(char *buf, size_t size)
{
    const char *fixed = getenv("UKVMI_STUB_DOMAIN");

    if (fixed && *fixed) {
        snprintf(buf, size, "%s", fixed);
        return;
    }
    pthread_mutex_lock(&name_lock);
    snprintf(buf, size, "%s", last_name);
    pthread_mutex_unlock(&name_lock);
}

static int conn_ok(virConnectPtr conn)
{
    return conn && conn->magic == CONN_MAGIC;
}

static int dom_ok(virDomainPtr dom)
{
    return dom && dom->magic == DOM_MAGIC;
}

static virDomainPtr new_domain(int id, const char *name)
{
    virDomainPtr dom = calloc(1, sizeof(*dom));

    if (!dom)
        return NULL;
    dom->name = strdup(name);
    if (!dom->name) {
        free(dom);
        return NULL;
    }
    dom->magic = DOM_MAGIC;
    dom->id = id;
    return dom;
}

/* ---- connections ---- */

STUB_EXPORT virConnectPtr virConnectOpenAuth(const char *name, virConnectAuthPtr auth, unsigned int flags)
{
    virConnectPtr conn = calloc(1, sizeof(*conn));

    (void)auth;
    if (!conn)
        return NULL;
    conn->uri = strdup(name ? name : "qemu:///system");
    if (!conn->uri) {
        free(conn);
        return NULL;
    }
    conn->magic = CONN_MAGIC;
    trace("virConnectOpenAuth(\"%s\", flags 0x%x) -> %p", conn->uri, flags, (void *)conn);
    return conn;
}

STUB_EXPORT int virConnectClose(virConnectPtr conn)
{
    trace("virConnectClose(%p)", (void *)conn);
    if (!conn_ok(conn))
        return -1;
    conn->magic = DEAD_MAGIC;
    free(conn->uri);
    free(conn);
    return 0;
}

STUB_EXPORT int virConnectGetLibVersion(virConnectPtr conn, unsigned long *libVer)
{
    if (!conn_ok(conn) || !libVer)
        return -1;
    /* major * 1,000,000 + minor * 1,000 + release: "9.0.0", Debian 12's. */
    *libVer = 9000000UL;
    trace("virConnectGetLibVersion -> %lu", *libVer);
    return 0;
}

/* ---- domains ---- */

STUB_EXPORT virDomainPtr virDomainLookupByName(virConnectPtr conn, const char *name)
{
    const char *fixed = getenv("UKVMI_STUB_DOMAIN");
    virDomainPtr dom;

    if (!conn_ok(conn) || !name || !*name) {
        trace("virDomainLookupByName(%s) -> NULL (bad arguments)", name ? name : "NULL");
        return NULL;
    }
    if (fixed && *fixed && strcmp(fixed, name) != 0) {
        trace("virDomainLookupByName(\"%s\") -> NULL (the VM is \"%s\")", name, fixed);
        return NULL;
    }
    if (!(fixed && *fixed)) {
        pthread_mutex_lock(&name_lock);
        snprintf(last_name, sizeof(last_name), "%s", name);
        pthread_mutex_unlock(&name_lock);
    }
    dom = new_domain(vm_id(), name);
    trace("virDomainLookupByName(\"%s\") -> id %d", name, dom ? dom->id : -1);
    return dom;
}

STUB_EXPORT virDomainPtr virDomainLookupByID(virConnectPtr conn, int id)
{
    char name[256];
    virDomainPtr dom;

    if (!conn_ok(conn) || id != vm_id()) {
        trace("virDomainLookupByID(%d) -> NULL (the VM is id %d)", id, vm_id());
        return NULL;
    }
    vm_name(name, sizeof(name));
    dom = new_domain(id, name);
    trace("virDomainLookupByID(%d) -> \"%s\"", id, name);
    return dom;
}

STUB_EXPORT unsigned int virDomainGetID(virDomainPtr dom)
{
    if (!dom_ok(dom))
        return (unsigned int)-1;
    trace("virDomainGetID -> %d", dom->id);
    return (unsigned int)dom->id;
}

STUB_EXPORT const char *virDomainGetName(virDomainPtr dom)
{
    if (!dom_ok(dom))
        return NULL;
    trace("virDomainGetName -> \"%s\"", dom->name);
    return dom->name;
}

STUB_EXPORT int virDomainGetInfo(virDomainPtr dom, virDomainInfoPtr info)
{
    if (!dom_ok(dom) || !info)
        return -1;
    memset(info, 0, sizeof(*info));
    info->state = VIR_DOMAIN_RUNNING;
    info->maxMem = env_ulong("UKVMI_STUB_MEMORY_KIB", 65536);
    info->memory = info->maxMem;
    info->nrVirtCpu = (unsigned short)env_ulong("UKVMI_STUB_VCPUS", 1);
    info->cpuTime = 0;
    trace("virDomainGetInfo -> running, %u vCPUs, %lu KiB", info->nrVirtCpu, info->memory);
    return 0;
}

STUB_EXPORT int virDomainFree(virDomainPtr dom)
{
    if (!dom_ok(dom))
        return -1;
    dom->magic = DEAD_MAGIC;
    free(dom->name);
    free(dom);
    return 0;
}

/* The VM runs under ukvmi, not libvirt: there is nothing here to suspend. */
STUB_EXPORT int virDomainSuspend(virDomainPtr dom)
{
    (void)dom;
    trace("virDomainSuspend -> -1 (not supported by the stub)");
    return -1;
}

STUB_EXPORT int virDomainResume(virDomainPtr dom)
{
    (void)dom;
    trace("virDomainResume -> -1 (not supported by the stub)");
    return -1;
}

/* libvirt-qemu: only LibVMI's legacy (QEMU monitor) driver calls this. */
STUB_EXPORT int virDomainQemuMonitorCommand(virDomainPtr domain, const char *cmd, char **result,
                                            unsigned int flags)
{
    (void)domain;
    (void)flags;
    if (result)
        *result = NULL;
    trace("virDomainQemuMonitorCommand(\"%s\") -> -1 (no QEMU monitor)", cmd ? cmd : "");
    return -1;
}
