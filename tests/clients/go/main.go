// cri-client-go: a CRI client that dials exactly as kubelet v1.26's remote
// runtime client does, and runs one fixed pod scenario, printing every
// answer as a JSON line for tests/tests/real_clients.rs to compare.
//
// Dialing, as in kubernetes v1.26:
//   - pkg/kubelet/util/util_unix.go GetAddressAndDialer: the endpoint
//     "unix:///path" becomes the gRPC target "/path" (the socket path) and a
//     dialer that opens the unix socket named by the address it is given;
//   - pkg/kubelet/cri/remote/remote_runtime.go NewRemoteRuntimeService:
//     grpc.DialContext(ctx, addr, insecure transport credentials,
//     grpc.WithContextDialer(dialer),
//     grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16 MiB))), no
//     authority override, then a CRI v1 Version call to validate.
//
// grpc-go 1.33 (Debian 12) has no credentials/insecure package (it came in
// 1.34); grpc.WithInsecure() is the same transport. With a target that has
// no scheme grpc-go uses the passthrough resolver and sends the target, the
// socket path, as the HTTP/2 :authority, as kubelet 1.26 does.
//
// Built offline in GOPATH mode from Debian's golang-go and
// golang-google-grpc-dev, with stubs protoc generates from
// proto/proto/cri/api.proto (see real_clients.rs).
//
// Output: one JSON object per line:
//
//	{"call": NAME, "ok": ANSWER}           a CRI answer (protojson, proto field names)
//	{"call": NAME, "error": {"code": C, "message": M}}
//	{"alias": VALUE, "as": NAME}           a run-specific value (id, IP, handler)
//	{"fatal": MESSAGE}                     the scenario could not go on (exit 1)
package main

import (
	"context"
	"crypto/md5"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	cri "fastsandbox.test/cri"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// maxMsgSize is kubelet's CRI message limit (pkg/kubelet/cri/remote/utils.go).
const maxMsgSize = 1024 * 1024 * 16

// callTimeout is kubelet's default runtime request timeout (2m).
const callTimeout = 2 * time.Minute

var (
	endpoint   = flag.String("endpoint", "", "CRI endpoint, as kubelet's --container-runtime-endpoint (unix:///path)")
	handler    = flag.String("handler", "", "runtime handler of the pods")
	image      = flag.String("image", "", "an image present on the node (never pulled)")
	testCase   = flag.String("case", "", "value of the test label every pod carries")
	logRoot    = flag.String("log-root", "", "directory for the pods' log directories")
	nameserver = flag.String("nameserver", "", "the pods' DNS server (inside the test's own range)")
)

const testLabel = "fast-sandbox.test/case"

var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

func emit(v interface{}) {
	outMu.Lock()
	defer outMu.Unlock()
	if err := out.Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, "writing output:", err)
		os.Exit(2)
	}
}

func jsonOf(m proto.Message) json.RawMessage {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		fatal("encoding %T: %v", m, err)
	}
	return b
}

func record(call string, m proto.Message, err error) {
	if err != nil {
		s, _ := status.FromError(err)
		emit(map[string]interface{}{"call": call, "error": map[string]string{
			"code": s.Code().String(), "message": s.Message(),
		}})
		return
	}
	emit(map[string]interface{}{"call": call, "ok": jsonOf(m)})
}

func alias(value, as string) {
	if value != "" {
		emit(map[string]string{"alias": value, "as": as})
	}
}

var cleanups []func()

func fatal(format string, args ...interface{}) {
	msg := fmt.Sprintf(format, args...)
	emit(map[string]string{"fatal": msg})
	fmt.Fprintln(os.Stderr, "cri-client-go:", msg)
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	os.Exit(1)
}

// getAddressAndDialer mirrors kubelet v1.26's util.GetAddressAndDialer for
// unix endpoints.
func getAddressAndDialer(ep string) (string, func(context.Context, string) (net.Conn, error), error) {
	u, err := url.Parse(ep)
	if err != nil {
		return "", nil, err
	}
	if u.Scheme != "unix" {
		return "", nil, fmt.Errorf("only support unix socket endpoint")
	}
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", addr)
	}
	return u.Path, dial, nil
}

func uid(name string) string {
	h := fmt.Sprintf("%x", md5.Sum([]byte(*testCase+"/"+name)))
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

type pod struct {
	name    string
	config  *cri.PodSandboxConfig
	sandbox string
	ctr     string
}

func newPod(name string) *pod {
	u := uid(name)
	logDir := filepath.Join(*logRoot, "fast-sandbox-test_"+name+"_"+u)
	if err := os.MkdirAll(filepath.Join(logDir, "app"), 0o755); err != nil {
		fatal("creating the log directory: %v", err)
	}
	ns := &cri.NamespaceOption{Network: cri.NamespaceMode_POD, Pid: cri.NamespaceMode_CONTAINER, Ipc: cri.NamespaceMode_POD}
	return &pod{name: name, config: &cri.PodSandboxConfig{
		Metadata: &cri.PodSandboxMetadata{Name: name, Uid: u, Namespace: "fast-sandbox-test"},
		Hostname: name, LogDirectory: logDir,
		DnsConfig: &cri.DNSConfig{Servers: []string{*nameserver}, Searches: []string{"fast-sandbox-test.svc.cluster.local"}, Options: []string{"ndots:5"}},
		Labels: map[string]string{
			"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "fast-sandbox-test",
			"io.kubernetes.pod.uid": u, testLabel: *testCase,
		},
		Annotations: map[string]string{"kubernetes.io/config.source": "api"},
		Linux: &cri.LinuxPodSandboxConfig{
			CgroupParent: "/kubepods/besteffort/pod" + u,
			// What kubelet sends for every pod sandbox (docs/warm-slots.md).
			SecurityContext: &cri.LinuxSandboxSecurityContext{
				NamespaceOptions: ns,
				Seccomp:          &cri.SecurityProfile{ProfileType: cri.SecurityProfile_RuntimeDefault},
			},
		},
	}}
}

func (p *pod) containerConfig() *cri.ContainerConfig {
	return &cri.ContainerConfig{
		Metadata: &cri.ContainerMetadata{Name: "app"},
		Image:    &cri.ImageSpec{Image: *image},
		Command:  []string{"/bin/sh", "-c"},
		Args:     []string{"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"},
		Labels: map[string]string{
			"io.kubernetes.container.name": "app", "io.kubernetes.pod.name": p.name,
			"io.kubernetes.pod.namespace": "fast-sandbox-test", "io.kubernetes.pod.uid": p.config.Metadata.Uid,
			testLabel: *testCase,
		},
		LogPath: "app/0.log",
		Linux: &cri.LinuxContainerConfig{SecurityContext: &cri.LinuxContainerSecurityContext{
			NamespaceOptions: p.config.Linux.SecurityContext.NamespaceOptions,
		}},
	}
}

// events collects the container events of the containers it is told about.
type events struct {
	mu      sync.Mutex
	cond    *sync.Cond
	seen    []*cri.ContainerEventResponse
	stopErr error
	done    bool
}

func (e *events) run(stream cri.RuntimeService_GetContainerEventsClient) {
	for {
		ev, err := stream.Recv()
		e.mu.Lock()
		if err != nil {
			e.stopErr, e.done = err, true
			e.cond.Broadcast()
			e.mu.Unlock()
			return
		}
		e.seen = append(e.seen, ev)
		e.cond.Broadcast()
		e.mu.Unlock()
	}
}

// wait waits until an event of type t for container id arrived, the stream
// ended, or the deadline passed.
func (e *events) wait(id string, t cri.ContainerEventType, deadline time.Time) {
	timer := time.AfterFunc(time.Until(deadline), func() { e.mu.Lock(); e.cond.Broadcast(); e.mu.Unlock() })
	defer timer.Stop()
	e.mu.Lock()
	defer e.mu.Unlock()
	for !e.done && time.Now().Before(deadline) {
		for _, ev := range e.seen {
			if ev.ContainerId == id && ev.ContainerEventType == t {
				return
			}
		}
		e.cond.Wait()
	}
}

func main() {
	flag.Parse()
	if *endpoint == "" || *handler == "" || *image == "" || *testCase == "" || *logRoot == "" || *nameserver == "" {
		flag.Usage()
		os.Exit(2)
	}
	alias(*handler, "handler")

	addr, dialer, err := getAddressAndDialer(*endpoint)
	if err != nil {
		fatal("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	conn, err := grpc.DialContext(ctx, addr,
		grpc.WithInsecure(),
		grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize)))
	if err != nil {
		fatal("dial %s: %v", addr, err)
	}
	defer conn.Close()
	rt := cri.NewRuntimeServiceClient(conn)

	version, err := rt.Version(ctx, &cri.VersionRequest{Version: "0.1.0"})
	record("Version", version, err)
	if err != nil {
		fatal("Version: %v", err)
	}
	st, err := rt.Status(ctx, &cri.StatusRequest{})
	record("Status", st, err)

	evCtx, evCancel := context.WithCancel(ctx)
	defer evCancel()
	ev := &events{}
	ev.cond = sync.NewCond(&ev.mu)
	stream, err := rt.GetContainerEvents(evCtx, &cri.GetEventsRequest{})
	if err != nil {
		record("GetContainerEvents", nil, err)
	} else {
		go ev.run(stream)
	}

	pods := []*pod{newPod("client-warm"), newPod("client-cold")}
	for _, p := range pods {
		p := p
		resp, err := rt.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: p.config, RuntimeHandler: *handler})
		record("RunPodSandbox "+p.name, resp, err)
		if err != nil {
			fatal("RunPodSandbox %s: %v", p.name, err)
		}
		p.sandbox = resp.PodSandboxId
		alias(p.sandbox, "sandbox "+p.name)
		cleanups = append(cleanups, func() {
			c, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			rt.StopPodSandbox(c, &cri.StopPodSandboxRequest{PodSandboxId: p.sandbox})
			rt.RemovePodSandbox(c, &cri.RemovePodSandboxRequest{PodSandboxId: p.sandbox})
		})
		sst, err := rt.PodSandboxStatus(ctx, &cri.PodSandboxStatusRequest{PodSandboxId: p.sandbox})
		if err == nil && sst.GetStatus().GetNetwork() != nil {
			alias(sst.GetStatus().GetNetwork().GetIp(), "ip "+p.name)
		}
		record("PodSandboxStatus "+p.name, sst, err)
		cc, err := rt.CreateContainer(ctx, &cri.CreateContainerRequest{PodSandboxId: p.sandbox, Config: p.containerConfig(), SandboxConfig: p.config})
		record("CreateContainer "+p.name, cc, err)
		if err != nil {
			fatal("CreateContainer %s: %v", p.name, err)
		}
		p.ctr = cc.ContainerId
		alias(p.ctr, "container "+p.name)
		sc, err := rt.StartContainer(ctx, &cri.StartContainerRequest{ContainerId: p.ctr})
		record("StartContainer "+p.name, sc, err)
		if err != nil {
			fatal("StartContainer %s: %v", p.name, err)
		}
	}

	list, err := rt.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{Filter: &cri.PodSandboxFilter{LabelSelector: map[string]string{testLabel: *testCase}}})
	if err == nil {
		sort.Slice(list.Items, func(i, j int) bool { return list.Items[i].Metadata.GetName() < list.Items[j].Metadata.GetName() })
	}
	record("ListPodSandbox", list, err)

	for _, p := range pods {
		es, err := rt.ExecSync(ctx, &cri.ExecSyncRequest{ContainerId: p.ctr, Cmd: []string{"/bin/sh", "-c", "echo hello from $(hostname)"}, Timeout: 10})
		record("ExecSync "+p.name, es, err)
		ex, err := rt.Exec(ctx, &cri.ExecRequest{ContainerId: p.ctr, Cmd: []string{"/bin/sh"}, Stdin: true, Stdout: true})
		record("Exec "+p.name, ex, err)
	}

	deadline := time.Now().Add(20 * time.Second)
	for _, p := range pods {
		ev.wait(p.ctr, cri.ContainerEventType_CONTAINER_STARTED_EVENT, deadline)
	}
	for _, p := range pods {
		r1, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: p.ctr, Timeout: 10})
		record("StopContainer "+p.name, r1, err)
		r2, err := rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: p.ctr})
		record("RemoveContainer "+p.name, r2, err)
		r3, err := rt.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.sandbox})
		record("StopPodSandbox "+p.name, r3, err)
		r4, err := rt.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.sandbox})
		record("RemovePodSandbox "+p.name, r4, err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for _, p := range pods {
		ev.wait(p.ctr, cri.ContainerEventType_CONTAINER_DELETED_EVENT, deadline)
	}

	// The events of our containers, in arrival order per container.
	ev.mu.Lock()
	for _, p := range pods {
		for _, e := range ev.seen {
			if e.ContainerId == p.ctr {
				record("GetContainerEvents "+p.name, e, nil)
			}
		}
	}
	if ev.done && ev.stopErr != nil && stream != nil {
		record("GetContainerEvents", nil, ev.stopErr)
	}
	ev.mu.Unlock()
}
