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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "fast-sandbox-pause 2"
#define HOST_NAME_LIMIT 64

static void write_stderr(const char *msg)
{
	size_t len = strlen(msg);
	while (len > 0) {
		ssize_t n = write(STDERR_FILENO, msg, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		msg += n;
		len -= (size_t)n;
	}
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

	for (;;)
		pause();

	/* Not reached. */
	write_stderr("pause: error: the pause loop ended\n");
	return 42;
}
