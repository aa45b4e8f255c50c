/*
 * pause: the process that holds a pod sandbox's namespaces.
 *
 * Does what Kubernetes' pause does: sleeps in pause(2), reaps every child
 * that is reparented to it (it is PID 1 of the pod's PID namespace when the
 * pod shares one), and exits 0 on SIGINT or SIGTERM so StopPodSandbox is
 * quick. Built static (gcc -static -Os) because its image has no libc.
 *
 * `pause --set-hostname NAME` sets the UTS hostname and exits: a warm slot of
 * a runtime whose pause is not a host process (gVisor's sentry, a Kata VM)
 * gets the pod's hostname from an exec of this mode inside the sandbox
 * (fast-sandbox-node's `guest-exec` fix-up), since there is no host UTS
 * namespace to setns into.
 *
 * The hostname channel: when its stdin is readable (gVisor slots, where
 * fast-sandbox-runsc gives the sandbox's pause two host FIFOs as stdin and
 * stdout and the capability CAP_SYS_ADMIN), the pause serves requests
 * `hostname SEQ NAME\n` on stdin, answering `SEQ ok\n` or `SEQ error TEXT\n`
 * on stdout, so the node plugin sets a claimed slot's hostname without a
 * `runsc exec`. SEQ is the caller's token (1 to 32 bytes of [0-9a-z-]).
 * When stdin ends or is unreadable (/dev/null: runc, crun and every cold
 * sandbox), it only pauses, as before.
 *
 * gVisor grants a spec's capabilities to a uid-0 process only, so the
 * adapter starts a channel pause as uid 0 with CAP_SYS_ADMIN alone and
 * names the image's user in FAST_SANDBOX_PAUSE_USER=UID:GID: the pause
 * becomes that user at once, keeping CAP_SYS_ADMIN and nothing else.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "fast-sandbox-pause 3"
#define HOST_NAME_LIMIT 64
/* "hostname " + a 32-byte token + " " + a 64-byte name + "\n", with room. */
#define LINE_LIMIT 256
#define TOKEN_LIMIT 32

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void write_stderr(const char *msg)
{
	write_all(STDERR_FILENO, msg, strlen(msg));
}

static void on_shutdown(int signo)
{
	(void)signo;
	/* Only async-signal-safe calls in a handler: write(2) and _exit(2). */
	write_stderr("pause: shutting down\n");
	_exit(0);
}

static void on_child(int signo)
{
	int saved = errno;
	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

static int install(int signo, void (*handler)(int), int flags)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	if (sigaction(signo, &sa, NULL) < 0) {
		perror("pause: sigaction");
		return -1;
	}
	return 0;
}

static int set_hostname(const char *name)
{
	size_t len = strlen(name);
	if (len > HOST_NAME_LIMIT) {
		write_stderr("pause: --set-hostname: name longer than 64 bytes\n");
		return 2;
	}
	if (sethostname(name, len) < 0) {
		perror("pause: sethostname");
		return 1;
	}
	return 0;
}

static int valid_token(const char *token, size_t len)
{
	if (len == 0 || len > TOKEN_LIMIT)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char c = token[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || c == '-'))
			return 0;
	}
	return 1;
}

/*
 * Becomes FAST_SANDBOX_PAUSE_USER (UID:GID) keeping only CAP_SYS_ADMIN.
 * Absent: nothing to do. Returns -1 (with a message) when a step fails;
 * the channel then answers errors and the node plugin falls back.
 */
static int drop_to_user(void)
{
	const char *spec = getenv("FAST_SANDBOX_PAUSE_USER");
	if (spec == NULL)
		return 0;
	char *end;
	unsigned long uid = strtoul(spec, &end, 10);
	if (*end != ':') {
		write_stderr("pause: FAST_SANDBOX_PAUSE_USER must be UID:GID\n");
		return -1;
	}
	unsigned long gid = strtoul(end + 1, &end, 10);
	if (*end != '\0') {
		write_stderr("pause: FAST_SANDBOX_PAUSE_USER must be UID:GID\n");
		return -1;
	}
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 || setgroups(0, NULL) < 0 ||
	    setgid((gid_t)gid) < 0 || setuid((uid_t)uid) < 0) {
		perror("pause: becoming FAST_SANDBOX_PAUSE_USER");
		return -1;
	}
	struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof(data));
	data[0].effective = data[0].permitted = 1u << CAP_SYS_ADMIN;
	if (syscall(SYS_capset, &header, data) < 0) {
		perror("pause: capset");
		return -1;
	}
	return 0;
}

/* Serves one request line (without its newline); answers on stdout. */
static void serve_line(char *line)
{
	char reply[LINE_LIMIT];
	const char *prefix = "hostname ";
	size_t plen = strlen(prefix);
	if (strncmp(line, prefix, plen) != 0)
		return;
	char *token = line + plen;
	char *name = strchr(token, ' ');
	if (name == NULL || !valid_token(token, (size_t)(name - token)))
		return;
	*name++ = '\0';
	size_t len = strlen(name);
	int n;
	if (len == 0 || len > HOST_NAME_LIMIT)
		n = snprintf(reply, sizeof(reply), "%s error name of %zu bytes\n", token, len);
	else if (sethostname(name, len) < 0)
		n = snprintf(reply, sizeof(reply), "%s error sethostname: %s\n", token,
			     strerror(errno));
	else
		n = snprintf(reply, sizeof(reply), "%s ok\n", token);
	if (n > 0)
		write_all(STDOUT_FILENO, reply, (size_t)n < sizeof(reply) ? (size_t)n : sizeof(reply) - 1);
}

/*
 * Reads request lines from stdin until it ends or fails. A line longer
 * than LINE_LIMIT is dropped whole. Bounded by the stdin's life: returns
 * at EOF (/dev/null at once) or on any read error but EINTR.
 */
static void serve_channel(void)
{
	char line[LINE_LIMIT];
	size_t used = 0;
	int overlong = 0;
	for (;;) {
		char c;
		ssize_t n = read(STDIN_FILENO, &c, 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		if (c != '\n') {
			if (used + 1 < sizeof(line))
				line[used++] = c;
			else
				overlong = 1;
			continue;
		}
		line[used] = '\0';
		if (!overlong)
			serve_line(line);
		used = 0;
		overlong = 0;
	}
}

int main(int argc, char **argv)
{
	if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
		printf("%s\n", VERSION);
		return 0;
	}
	if (argc > 1 && strcmp(argv[1], "--set-hostname") == 0) {
		if (argc != 3) {
			write_stderr("usage: pause --set-hostname NAME\n");
			return 2;
		}
		return set_hostname(argv[2]);
	}
	if (getpid() != 1)
		write_stderr("pause: warning: not running as PID 1\n");

	if (install(SIGINT, on_shutdown, 0) < 0 || install(SIGTERM, on_shutdown, 0) < 0 ||
	    install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) < 0)
		return 1;

	drop_to_user();
	serve_channel();
	for (;;)
		pause();

	/* Not reached. */
	write_stderr("pause: error: the pause loop ended\n");
	return 42;
}
