package main

// The tests run the proxy on real sockets, in process (startProxy: newProxy
// and run, as main calls them) or as the built binary (startBinary), and
// talk to it with a WebSocket client of their own (wsClient) that can send
// fragments, withhold pongs and read close codes. Redis is the fake at the
// end of this file, which speaks RESP over TCP and misbehaves on demand;
// with WSPROXY_TEST_REDIS_URL set, the tests that need no misbehaviour use
// that Redis instead, and tests that kill Redis start a redis-server of
// their own (README: Testing).
//
// Helpers come first, then the tests in the order of the README's
// sections: Quick start; Configuration; Protocol: Endpoints, Handshake
// (with the refusals a browser can read), Authentication, Messages,
// Liveness, Close codes; Operations: Logs, Metrics, Limits and abuse, Redis
// outages and shutdown, Several instances, Container; then the examples,
// the benchmarks, and the fake Redis with its own tests.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"debug/elf"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

// ---------------------------------------------------------------------------
// Helpers: assertions, waiting, ids, ports, the built programs

// processWait bounds every wait on another process: a start, a line, a message.
const processWait = 20 * time.Second

// check fails the test unless got equals want.
func check(t testing.TB, what string, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		if err, ok := got.(error); ok {
			got = err.Error()
		}
		t.Fatalf("%s = %#v, want %#v", what, got, want)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// eventually polls cond until it holds, for states no signal announces (a
// metric, a count in Redis, a goroutine).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// holdsFor runs check repeatedly for d: the one way to assert that a state
// lasts, which no signal can announce.
func holdsFor(t testing.TB, d time.Duration, check func()) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		check()
	}
}

// expectMessage fails unless want arrives on ch.
func expectMessage(t testing.TB, ch <-chan []byte, want string) {
	t.Helper()
	select {
	case got := <-ch:
		check(t, "message", string(got), want)
	case <-time.After(processWait):
		t.Fatalf("%.60q never arrived", want)
	}
}

// expectNothing fails if a message arrives on ch within d.
func expectNothing(t testing.TB, ch <-chan []byte, d time.Duration) {
	t.Helper()
	select {
	case m := <-ch:
		t.Errorf("got %.60q, want nothing", m)
	case <-time.After(d):
	}
}

func randomID() string {
	b := make([]byte, 12)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func makeJWT(secret string, header, claims map[string]any) string {
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	signing := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signing))
	return signing + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// goroutinesIn counts goroutines whose stack mentions any of the functions.
func goroutinesIn(functions ...string) int {
	buf := make([]byte, 8<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if slices.ContainsFunc(functions, func(f string) bool { return strings.Contains(g, f) }) {
			n++
		}
	}
	return n
}

// liveHeap is the heap in use after a collection.
func liveHeap() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

var programs struct {
	once sync.Once
	dir  string
	err  error
}

// program is the path of the proxy ("wsproxy") or of an example, all built
// once per run with CGO_ENABLED=0, as the Dockerfile builds the proxy.
func program(t testing.TB, name string) string {
	t.Helper()
	programs.once.Do(func() {
		if programs.dir, programs.err = os.MkdirTemp("", "wsproxy-bin"); programs.err == nil {
			cmd := exec.Command("go", "build", "-o", programs.dir+string(filepath.Separator), ".", "./examples/...")
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				programs.err = fmt.Errorf("go build: %v\n%s", err, out)
			}
		}
	})
	must(t, programs.err)
	return filepath.Join(programs.dir, name)
}

// TestMain removes the built programs.
func TestMain(m *testing.M) {
	code := m.Run()
	if programs.dir != "" {
		os.RemoveAll(programs.dir)
	}
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// Helpers: output and processes

// output collects what a proxy or a process writes, and wakes whoever
// waits for more.
type output struct {
	mu      sync.Mutex
	text    bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newOutput() *output { return &output{changed: make(chan struct{})} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.text.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

// snapshot returns the text so far and a channel closed when it grows.
func (o *output) snapshot() (string, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.text.String(), o.changed
}

func (o *output) String() string { text, _ := o.snapshot(); return text }

// await waits until done accepts the text so far, and returns it. It fails
// the test after processWait, or once stop is closed (the writer exited)
// and the text left does not do.
func (o *output) await(t testing.TB, what string, stop <-chan struct{}, done func(string) bool) string {
	t.Helper()
	deadline := time.After(processWait)
	for {
		text, changed := o.snapshot()
		if done(text) {
			return text
		}
		select {
		case <-changed:
		case <-stop:
			if text := o.String(); done(text) {
				return text
			}
			t.Fatalf("exited before %s:\n%s", what, o)
		case <-deadline:
			t.Fatalf("no %s after %v:\n%s", what, processWait, text)
		}
	}
}

// records parses the JSON log records in text; other lines are skipped.
func records(text string) (recs []map[string]any) {
	for _, line := range strings.Split(text, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil {
			recs = append(recs, rec)
		}
	}
	return recs
}

// process is a program a test started in a process group of its own, which
// is killed when the test ends.
type process struct {
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *output       // stdout and stderr
	stderr *output       // stderr alone
	exited chan struct{} // closed once it has exited
	err    error         // its exit status, once exited is closed
}

// startProcess starts path with args in dir with env (see cleanEnv). What
// it prints goes to out, or to an output of its own, shown if the test fails.
func startProcess(t testing.TB, name, dir string, env []string, out *output, path string, args ...string) *process {
	t.Helper()
	own := out == nil
	if own {
		out = newOutput()
	}
	p := &process{name: name, cmd: exec.Command(path, args...), out: out, stderr: newOutput(), exited: make(chan struct{})}
	p.cmd.Dir, p.cmd.Env, p.cmd.Stdout, p.cmd.Stderr = dir, env, out, io.MultiWriter(out, p.stderr)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p.cmd.WaitDelay = 2 * time.Second // a child left holding the output pipe must not hang Wait
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err == nil {
		err = p.cmd.Start()
	}
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }() // ends with the process; kill waits for it
	t.Cleanup(func() {
		p.kill(t)
		if t.Failed() && own {
			t.Logf("%s printed:\n%s", name, out)
		}
	})
	return p
}

// kill ends the process group with SIGKILL, as a crash would, and waits.
func (p *process) kill(t testing.TB) {
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(processWait):
		t.Errorf("%s (pid %d) still runs after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

func (p *process) signal(t testing.TB, sig syscall.Signal) time.Time {
	must(t, p.cmd.Process.Signal(sig))
	return time.Now()
}

// waitExit returns the exit status as an error (nil for 0), or an error if
// the process still runs after limit.
func (p *process) waitExit(limit time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(limit):
		return fmt.Errorf("%s still runs after %v", p.name, limit)
	}
}

// exitStatus waits for the process to exit and returns its status.
func (p *process) exitStatus(t testing.TB) int {
	t.Helper()
	var exit *exec.ExitError
	if err := p.waitExit(processWait); errors.As(err, &exit) {
		return exit.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", p.name, err)
	}
	return 0
}

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// waitOutput waits until what the process printed satisfies done.
func (p *process) waitOutput(t testing.TB, what string, done func(string) bool) string {
	t.Helper()
	return p.out.await(t, p.name+": "+what, p.exited, done)
}

// cleanEnv is the environment without the variables the proxy and the
// examples read, plus extra: a developer's shell cannot change what is tested.
func cleanEnv(extra ...string) []string {
	cfg, _ := loadConfig(func(string) string { return "" })
	read := []string{"WSPROXY_URL"}
	for _, a := range cfg.effective {
		read = append(read, a.Key)
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return slices.Contains(read, strings.Split(kv, "=")[0]) })
	return append(env, extra...)
}

// ---------------------------------------------------------------------------
// Helpers: Redis

// testRedis is the Redis a test talks to: the fake, or a real one.
type testRedis struct {
	url  string
	fake *fakeRedis // nil for a real Redis
}

// noRedis is an address where no Redis answers.
var noRedis = &testRedis{url: "redis://127.0.0.1:1"}

// newTestRedis is the Redis of WSPROXY_TEST_REDIS_URL if set, else a fake.
func newTestRedis(t testing.TB) *testRedis {
	if u := os.Getenv("WSPROXY_TEST_REDIS_URL"); u != "" {
		return &testRedis{url: u}
	}
	r, _ := newFake(t)
	return r
}

// newFake is always the fake, for a test that makes it misbehave.
func newFake(t testing.TB) (*testRedis, *fakeRedis) {
	f := newFakeRedis(t)
	return &testRedis{url: f.URL(), fake: f}, f
}

// realRedis is WSPROXY_TEST_REDIS_URL, else a redis-server of the test's
// own: the examples (redis-cli, redis-py) need more than the fake knows.
func realRedis(t testing.TB) *testRedis {
	if u := os.Getenv("WSPROXY_TEST_REDIS_URL"); u != "" {
		return &testRedis{url: u}
	}
	return &testRedis{url: startRedisServer(t).url()}
}

func (r *testRedis) do(t testing.TB, cmd string, args ...any) any {
	t.Helper()
	c, err := redis.DialURL(r.url, redis.DialConnectTimeout(processWait), redis.DialReadTimeout(processWait))
	must(t, err)
	defer c.Close()
	v, err := c.Do(cmd, args...)
	must(t, err)
	return v
}

// subscribers is how many clients are subscribed to channel (-1: unknown),
// from any goroutine.
func (r *testRedis) subscribers(channel string) int {
	if r.fake != nil {
		return r.fake.Subscribers(channel)
	}
	c, err := redis.DialURL(r.url)
	if err != nil {
		return -1
	}
	defer c.Close()
	if reply, err := redis.Values(c.Do("PUBSUB", "NUMSUB", channel)); err == nil && len(reply) == 2 {
		n, _ := redis.Int(reply[1], nil)
		return n
	}
	return -1
}

func (r *testRedis) waitNumSub(t testing.TB, channel string, n int) {
	t.Helper()
	eventually(t, fmt.Sprintf("%d subscribers on %s", n, channel), func() bool { return r.subscribers(channel) == n })
}

// session stores a token for a new session id and returns both.
func (r *testRedis) session(t testing.TB) (id, token string) {
	id, token = randomID(), randomID()
	r.do(t, "SET", "session:"+id+":auth", token, "EX", 600)
	return id, token
}

// publish publishes to a session's down channel, and returns the receivers.
func (r *testRedis) publish(t testing.TB, sessionID, message string) int {
	n, _ := redis.Int(r.do(t, "PUBLISH", "session:"+sessionID+":down", message), nil)
	return n
}

// up returns what is published to a session's up channel, until the test ends.
func (r *testRedis) up(t testing.TB, sessionID string) <-chan []byte {
	t.Helper()
	c, err := redis.DialURL(r.url, redis.DialConnectTimeout(processWait))
	must(t, err)
	psc := redis.PubSubConn{Conn: c}
	must(t, psc.Subscribe("session:"+sessionID+":up"))
	if _, ok := psc.ReceiveWithTimeout(processWait).(redis.Subscription); !ok {
		t.Fatalf("SUBSCRIBE was not confirmed")
	}
	messages, done := make(chan []byte, 100), make(chan struct{})
	go func() { // ends when the cleanup closes the connection
		defer close(done)
		for {
			switch v := psc.Receive().(type) {
			case redis.Message:
				select {
				case messages <- v.Data:
				default: // nobody reads any more
				}
			case error:
				return
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return messages
}

// sessionChannels is what the fake has subscribed, but the keepalive channel.
func sessionChannels(fake *fakeRedis) []string {
	return slices.DeleteFunc(fake.SubscribedChannels(), func(c string) bool { return c == keepaliveChannel })
}

// redisServer is a redis-server of the test's own on a free port, without
// persistence, which the test can kill and start again on the same port.
type redisServer struct {
	t    testing.TB
	port int
	proc *process
}

// startRedisServer starts one, or skips the test when none is installed.
func startRedisServer(t testing.TB) *redisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed (apt-get install redis-server): this test needs a Redis of its own")
	}
	s := &redisServer{t: t, port: freePort(t)}
	s.start()
	return s
}

func (s *redisServer) url() string { return "redis://127.0.0.1:" + strconv.Itoa(s.port) }

// start runs redis-server and waits until it accepts connections.
func (s *redisServer) start() {
	s.t.Helper()
	s.proc = startProcess(s.t, "redis-server", s.t.TempDir(), cleanEnv(), nil, "redis-server",
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	s.proc.waitOutput(s.t, "readiness", func(text string) bool { return strings.Contains(text, "Ready to accept connections") })
}

// kill stops it with SIGKILL, as a crash would.
func (s *redisServer) kill() { s.proc.kill(s.t) }

// ---------------------------------------------------------------------------
// Helpers: the proxy, in process or as a process

// endpoint is how a test reaches a proxy: its address and its log.
type endpoint struct {
	addr string
	logs *output
}

var httpClient = &http.Client{Transport: &http.Transport{}}

// httpGet makes one request, from any goroutine.
func httpGet(addr, path string, limit time.Duration) (int, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	start := time.Now()
	resp, err := httpClient.Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: no answer after %v: %v", path, time.Since(start).Round(time.Millisecond), err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body)), err
}

// getWithin fails the test unless the proxy answers path within limit.
func (e endpoint) getWithin(t testing.TB, path string, limit time.Duration) (int, string) {
	t.Helper()
	status, body, err := httpGet(e.addr, path, limit)
	must(t, err)
	return status, body
}

// expectGet fails unless path answers status, with a body that contains part.
func (e endpoint) expectGet(t testing.TB, path string, status int, part string) {
	t.Helper()
	if got, body := e.getWithin(t, path, 5*time.Second); got != status || !strings.Contains(body, part) {
		t.Errorf("%s: %d %s, want %d and %s", path, got, body, status, part)
	}
}

// metric is the value of one exposition line, e.g.
// `wsproxy_messages_total{direction="up"}`.
func (e endpoint) metric(t testing.TB, series string) float64 {
	t.Helper()
	_, body := e.getWithin(t, "/metrics", 5*time.Second)
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(rest, 64)
			must(t, err)
			return v
		}
	}
	t.Fatalf("metric %s not found in:\n%s", series, body)
	return 0
}

// expectMetrics fails unless every series has its value.
func (e endpoint) expectMetrics(t testing.TB, want map[string]float64) {
	t.Helper()
	for _, series := range slices.Sorted(maps.Keys(want)) {
		if got := e.metric(t, series); got != want[series] {
			t.Errorf("%s = %v, want %v", series, got, want[series])
		}
	}
}

// handshakes is the series counting handshakes with result.
func handshakes(result string) string { return `wsproxy_connections_total{result="` + result + `"}` }

// waitLog waits for a JSON log record that match accepts, and returns it.
func (e endpoint) waitLog(t testing.TB, what string, match func(map[string]any) bool) (found map[string]any) {
	t.Helper()
	e.logs.await(t, what, nil, func(text string) bool {
		if i := slices.IndexFunc(records(text), match); i >= 0 {
			found = records(text)[i]
		}
		return found != nil
	})
	return found
}

func bearer(token string) http.Header { return http.Header{"Authorization": {"Bearer " + token}} }

// dial sends a WebSocket handshake for path with header; it returns the
// client on 101, else the refusal.
func (e endpoint) dial(t testing.TB, path string, header http.Header) (*wsClient, handshakeResult) {
	t.Helper()
	return dialWS(t, nil, e.addr, path, header)
}

// connect opens a WebSocket for a session with its token in the header,
// and fails the test unless it gets 101.
func (e endpoint) connect(t testing.TB, sessionID, token string) *wsClient {
	t.Helper()
	return e.connectWith(t, nil, sessionID, token)
}

// connectSlow is connect with a 4 KiB receive buffer, so that a client that
// does not read stops taking bytes almost at once.
func (e endpoint) connectSlow(t testing.TB, sessionID, token string) *wsClient {
	t.Helper()
	return e.connectWith(t, &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}, sessionID, token)
}

func (e endpoint) connectWith(t testing.TB, d *net.Dialer, sessionID, token string) *wsClient {
	t.Helper()
	c, res := dialWS(t, d, e.addr, "/agent-1/ws/"+sessionID, bearer(token))
	if c == nil {
		t.Fatalf("handshake: %d %s", res.status, res.body)
	}
	return c
}

// expectRefused fails unless a handshake for path with header is refused
// with status and code.
func (e endpoint) expectRefused(t testing.TB, path string, header http.Header, status int, code string) handshakeResult {
	t.Helper()
	c, res := e.dial(t, path, header)
	if c != nil || res.status != status || res.code != code {
		t.Errorf("%s: %d %s, want %d %s", path, res.status, res.body, status, code)
	}
	return res
}

// dialed is a handshake made on a goroutine of its own (dialAsync), for a
// test that acts while it waits.
type dialed struct {
	c   *wsClient
	res handshakeResult
	err error
}

func (e endpoint) dialAsync(path string, header http.Header) <-chan dialed {
	ch := make(chan dialed, 1)
	go func() { c, res, err := tryDial(nil, e.addr, path, header); ch <- dialed{c, res, err} }()
	return ch
}

// client fails the test unless the handshake got 101, and returns the client.
func (d dialed) client(t testing.TB) *wsClient {
	t.Helper()
	if d.c == nil {
		t.Fatalf("handshake: %d %s %v", d.res.status, d.res.body, d.err)
	}
	d.c.t = t
	t.Cleanup(func() { d.c.conn.Close() })
	return d.c
}

// testProxy is a proxy running in process on a loopback port.
type testProxy struct {
	endpoint
	p *proxy
}

// startProxy runs a proxy against r with env over the tests' defaults
// (debug logs, no shutdown grace period); it waits until the subscriber is
// connected unless r is noRedis, and is stopped by a signal when the test
// ends.
func startProxy(t testing.TB, r *testRedis, env ...string) *testProxy {
	t.Helper()
	vars := map[string]string{"REDIS_URL": r.url, "LOG_LEVEL": "debug", "SHUTDOWN_GRACE_PERIOD_SECS": "0"}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	cfg, err := loadConfig(func(k string) string { return vars[k] })
	must(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	tp := &testProxy{endpoint: endpoint{ln.Addr().String(), newOutput()}}
	tp.p = newProxy(cfg, newLogger(cfg, tp.logs))
	signals, done := make(chan os.Signal, 1), make(chan error, 1)
	go func() { done <- tp.p.run(ln, signals) }() // ends after the cleanup's signal
	t.Cleanup(func() {
		signals <- os.Interrupt
		select {
		case err := <-done:
			must(t, err)
		case <-time.After(processWait):
			t.Errorf("the proxy did not stop")
		}
		if t.Failed() {
			t.Logf("proxy logs:\n%s", tp.logs)
		}
	})
	if r != noRedis {
		eventually(t, "the proxy's subscriber connected", tp.p.hub.connected)
	}
	return tp
}

// connOf returns the proxy's one open connection of a session.
func (tp *testProxy) connOf(t testing.TB, sessionID string) (c *conn) {
	t.Helper()
	eventually(t, "the connection in the hub", func() bool {
		tp.p.hub.mu.Lock()
		defer tp.p.hub.mu.Unlock()
		if conns := tp.p.hub.channels["session:"+sessionID+":down"]; len(conns) == 1 {
			conns[0].mu.Lock()
			if conns[0].started { // serve has begun
				c = conns[0]
			}
			conns[0].mu.Unlock()
		}
		return c != nil
	})
	return c
}

// proxyProcess is the built proxy running as a process.
type proxyProcess struct {
	endpoint
	*process
}

// startBinary runs the built proxy against redisURL on a free loopback port
// (or env's PORT), JSON logs at debug, env over those. It does not wait for
// the proxy: waitReady does.
func startBinary(t testing.TB, redisURL string, env ...string) *proxyProcess {
	t.Helper()
	return startProxyProcess(t, []string{program(t, "wsproxy")}, append([]string{"REDIS_URL=" + redisURL}, env...)...)
}

// startProxyProcess runs argv, the binary or a command that runs it, with
// the proxy's environment, in an empty directory (no stray .env).
func startProxyProcess(t testing.TB, argv []string, env ...string) *proxyProcess {
	t.Helper()
	port := strconv.Itoa(freePort(t))
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PORT="); ok {
			port = v
		}
	}
	env = cleanEnv(append([]string{"HOST=127.0.0.1", "PORT=" + port, "LOG_FORMAT=json", "LOG_LEVEL=debug"}, env...)...)
	p := startProcess(t, "wsproxy", t.TempDir(), env, nil, argv[0], argv[1:]...)
	return &proxyProcess{endpoint{"127.0.0.1:" + port, p.out}, p}
}

// waitReady polls /ready until it answers 200: the proxy announces
// readiness in no other way.
func (p *proxyProcess) waitReady(t testing.TB) {
	t.Helper()
	eventually(t, "the proxy ready", func() bool {
		if p.hasExited() {
			t.Fatalf("the proxy exited (%v):\n%s", p.err, p.out)
		}
		status, _, _ := httpGet(p.addr, "/ready", time.Second)
		return status == 200
	})
}

// ---------------------------------------------------------------------------
// Helpers: the WebSocket client (RFC 6455)

// wsClient is one end of a WebSocket: a client, which masks what it sends,
// or with server set the server end of a hijacked connection. It writes any
// frame, even one a peer must not send.
type wsClient struct {
	t        testing.TB
	conn     net.Conn
	br       *bufio.Reader
	server   bool          // sends unmasked frames and reads masked ones
	autoPong bool          // next answers pings
	pings    int           // pings next has read
	wait     time.Duration // how long read waits for a message
}

type frame struct {
	fin     bool
	op      byte
	payload []byte
}

type handshakeResult struct {
	status int
	body   string
	code   string // the "error" field of the body
	header http.Header
}

// dialWS sends a WebSocket handshake through d (nil: the default dialer),
// with header over the upgrade's own (a nil value removes one). It returns
// the client on 101, closed when the test ends, else the refusal.
func dialWS(t testing.TB, d *net.Dialer, addr, path string, header http.Header) (*wsClient, handshakeResult) {
	t.Helper()
	c, res, err := tryDial(d, addr, path, header)
	must(t, err)
	if c != nil {
		c.t = t
		t.Cleanup(func() { c.conn.Close() })
	}
	return c, res
}

// tryDial is dialWS for goroutines other than the test's.
func tryDial(d *net.Dialer, addr, path string, header http.Header) (*wsClient, handshakeResult, error) {
	nc, err := cmp.Or(d, &net.Dialer{}).Dial("tcp", addr)
	if err != nil {
		return nil, handshakeResult{}, err
	}
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Header = http.Header{"Upgrade": {"websocket"}, "Connection": {"Upgrade"}, "Sec-Websocket-Version": {"13"},
		"Sec-Websocket-Key": {base64.StdEncoding.EncodeToString([]byte(randomID()[:16]))}}
	for k, v := range header {
		if req.Header[http.CanonicalHeaderKey(k)] = v; v == nil {
			delete(req.Header, http.CanonicalHeaderKey(k))
		}
	}
	if host := header.Get("Host"); host != "" {
		req.Host = host // req.Write takes it from here
	}
	nc.SetReadDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(nc)
	var resp *http.Response
	if err = req.Write(nc); err == nil {
		resp, err = http.ReadResponse(br, req)
	}
	if err != nil {
		nc.Close()
		return nil, handshakeResult{}, fmt.Errorf("handshake: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		nc.Close()
		var e struct{ Error string }
		json.Unmarshal(body, &e)
		return nil, handshakeResult{resp.StatusCode, string(body), e.Error, resp.Header}, nil
	}
	nc.SetReadDeadline(time.Time{})
	return &wsClient{conn: nc, br: br, autoPong: true, wait: 5 * time.Second}, handshakeResult{status: 101, header: resp.Header}, nil
}

// encodeHeader encodes a frame's header for any length, even one that may
// not be sent; a masked one ends with the mask 1 2 3 4 (see mask).
func encodeHeader(fin bool, op byte, n uint64, masked bool) []byte {
	h := []byte{op, 0}
	if fin {
		h[0] |= 0x80
	}
	switch {
	case n <= 125:
		h[1] = byte(n)
	case n <= 0xFFFF:
		h = append(h[:1], 126, byte(n>>8), byte(n))
	default:
		h = binary.BigEndian.AppendUint64(append(h[:1], 127), n)
	}
	if masked {
		h[1] |= 0x80
		h = append(h, 1, 2, 3, 4)
	}
	return h
}

// mask masks payload with 1 2 3 4.
func mask(payload []byte) []byte {
	masked := make([]byte, len(payload))
	for i := range payload {
		masked[i] = payload[i] ^ byte(i%4+1)
	}
	return masked
}

func (c *wsClient) writeFrame(fin bool, op byte, payload []byte) error {
	if !c.server {
		payload = mask(payload)
	}
	_, err := c.conn.Write(append(encodeHeader(fin, op, uint64(len(payload)), !c.server), payload...))
	return err
}

func (c *wsClient) sendText(s string) { must(c.t, c.writeFrame(true, opText, []byte(s))) }

// sendClose sends a close frame with code.
func (c *wsClient) sendClose(code int) {
	c.writeFrame(true, opClose, binary.BigEndian.AppendUint16(nil, uint16(code)))
}

// readFrame reads one frame as it arrives.
func (c *wsClient) readFrame(timeout time.Duration) (frame, error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	h := make([]byte, 2, 14)
	if _, err := io.ReadFull(c.br, h); err != nil {
		return frame{}, err
	}
	if masked := h[1]&0x80 != 0; masked != c.server {
		return frame{}, fmt.Errorf("a frame masked %v, want %v (RFC 6455 §5.1)", masked, c.server)
	}
	n, more := uint64(h[1]&0x7f), map[byte]int{126: 2, 127: 8}[h[1]&0x7f]
	if c.server {
		more += 4 // the mask
	}
	h = h[:2+more]
	if _, err := io.ReadFull(c.br, h[2:]); err != nil {
		return frame{}, err
	}
	switch n {
	case 126:
		n = uint64(binary.BigEndian.Uint16(h[2:]))
	case 127:
		n = binary.BigEndian.Uint64(h[2:])
	}
	f := frame{fin: h[0]&0x80 != 0, op: h[0] & 0x0f, payload: make([]byte, n)}
	_, err := io.ReadFull(c.br, f.payload)
	for i := range f.payload {
		if c.server {
			f.payload[i] ^= h[len(h)-4+i%4]
		}
	}
	return f, err
}

// next returns the next data or close frame, answering pings on the way.
func (c *wsClient) next(timeout time.Duration) (frame, error) {
	deadline := time.Now().Add(timeout)
	for {
		f, err := c.readFrame(time.Until(deadline))
		if err != nil || (f.op != opPing && f.op != opPong) {
			return f, err
		}
		if f.op == opPing {
			c.pings++
			if c.autoPong {
				c.writeFrame(true, opPong, f.payload)
			}
		}
	}
}

// read returns the next data message, failing the test on anything else.
// wsproxy never fragments (README: Messages).
func (c *wsClient) read() frame {
	c.t.Helper()
	f, err := c.next(c.wait)
	switch {
	case err != nil:
		c.t.Fatalf("read: %v", err)
	case f.op == opClose:
		c.t.Fatalf("read: got close %d %q", closeCode(f.payload), f.payload[min(2, len(f.payload)):])
	case !f.fin:
		c.t.Fatalf("read: a fragment (opcode %d)", f.op)
	}
	return f
}

func (c *wsClient) readText() string {
	c.t.Helper()
	f := c.read()
	check(c.t, "opcode", f.op, byte(opText))
	return string(f.payload)
}

// expectText fails unless the next message is the text want.
func (c *wsClient) expectText(want string) {
	c.t.Helper()
	if got := c.readText(); got != want {
		c.t.Fatalf("got %.60q, want %.60q", got, want)
	}
}

// expectControlError fails unless the next message is a control error
// (README: Messages) with code.
func (c *wsClient) expectControlError(code string) {
	c.t.Helper()
	var m struct{ Type, Command, Code, Message string }
	if text := c.readText(); json.Unmarshal([]byte(text), &m) != nil || m.Type != "control" || m.Command != "error" || m.Message == "" || m.Code != code {
		c.t.Fatalf("got %s, want a control error %s", text, code)
	}
}

// expectClose skips data until the close frame and returns its code and
// reason; 1006 when the connection ended without one.
func (c *wsClient) expectClose(timeout time.Duration) (int, string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	f, err := c.next(timeout)
	for ; err == nil && f.op != opClose; f, err = c.next(time.Until(deadline)) {
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.t.Fatalf("no close within %v", timeout)
	} else if err != nil {
		return 1006, err.Error()
	}
	return closeCode(f.payload), string(f.payload[min(2, len(f.payload)):])
}

// expectCloseCode fails unless the connection closes with code within 5 s.
func (c *wsClient) expectCloseCode(code int) {
	c.t.Helper()
	if got, reason := c.expectClose(5 * time.Second); got != code {
		c.t.Errorf("close %d %q, want %d", got, reason, code)
	}
}

// expectEnd reads what is left of the connection and returns its close
// frame, or nil when the socket ended without one; it fails the test if the
// connection is still open after 5 s.
func (c *wsClient) expectEnd() *frame {
	c.t.Helper()
	for {
		f, err := c.next(5 * time.Second)
		var netErr net.Error
		switch {
		case errors.As(err, &netErr) && netErr.Timeout():
			c.t.Fatal("the connection is still open")
		case err != nil:
			return nil
		case f.op == opClose:
			return &f
		}
	}
}

// expectShed fails unless the connection ends as a slow client's does:
// with 1008 reason, or, when a frame was half-written to it, by the end of
// the socket without a close frame.
func (c *wsClient) expectShed(reason ...string) {
	c.t.Helper()
	want := fmt.Sprintf("1008 %s", cmp.Or(strings.Join(reason, ""), "client too slow"))
	if f := c.expectEnd(); f != nil {
		check(c.t, "shed with", fmt.Sprintf("%d %s", closeCode(f.payload), f.payload[min(2, len(f.payload)):]), want)
	}
}

func closeCode(payload []byte) int {
	if len(payload) < 2 {
		return 1005
	}
	return int(binary.BigEndian.Uint16(payload))
}

// ---------------------------------------------------------------------------
// README: Quick start (and examples/README.md's walkthrough)

// The walkthroughs run exactly as written, against the built proxy and
// examples and a redis-server of their own (they use fixed ids): each
// terminal prints what the document says (see runWalkthrough).
func TestWalkthrough(t *testing.T) {
	for _, document := range []string{"README.md", "examples/README.md"} {
		t.Run(document, func(t *testing.T) {
			steps, err := parseWalkthrough(document)
			must(t, err)
			runWalkthrough(t, steps, startRedisServer(t).url())
		})
	}
}

// ---------------------------------------------------------------------------
// README: Configuration

func TestConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(func(string) string { return "" })
	must(t, err)
	want := config{Host: "0.0.0.0", Port: 8080, RedisURL: "redis://127.0.0.1:6379",
		PingInterval: 30 * time.Second, PingTimeout: 10 * time.Second, ShutdownGrace: 30 * time.Second,
		AuthMode: "redis", AuthTimeout: 5 * time.Second, AuthGrace: 10800 * time.Second,
		SubscribeTimeout: 5 * time.Second, MaxConnections: 50000, MaxMessageSize: 1048576, MaxBufferSize: 10485760,
		MaxTotalBuffer: 128 << 20, IdleTimeout: 0, StreamEndTimeout: 60 * time.Second, UpstreamEnabled: true, LogFormat: "json"}
	cfg.effective = nil // what the start-up log shows: TestUnknownDotEnvKeysWarnedAndConfigLoggedRedacted
	check(t, "defaults", fmt.Sprint(*cfg), fmt.Sprint(want))
}

// A malformed value is an error naming the variable (a short JWT secret is
// not repeated); the binary stops with exit status 2 and one line.
func TestMalformedValueExitsWithStatus2AndOneLine(t *testing.T) {
	for _, tc := range [][2]string{
		{"PORT", "abc"}, {"PORT", "0"}, {"PORT", "65536"}, {"REDIS_URL", "http://localhost:6379"}, {"REDIS_URL", "localhost:6379"},
		{"WS_PING_INTERVAL_SECS", "-1"}, {"WS_PING_INTERVAL_SECS", "0"}, {"WS_PING_TIMEOUT_SECS", "ten"},
		{"SHUTDOWN_GRACE_PERIOD_SECS", "-5"}, {"AUTH_TIMEOUT_SECS", "NaN"}, {"AUTH_GRACE_PERIOD_SECS", "-1"},
		{"SUBSCRIBE_TIMEOUT_SECS", "x"}, {"MAX_CONNECTIONS", "-3"}, {"MAX_MESSAGE_SIZE_BYTES", "1MB"},
		{"MAX_BUFFER_SIZE_BYTES", "0"}, {"MAX_TOTAL_BUFFER_BYTES", "1000"}, {"MAX_TOTAL_BUFFER_BYTES", "-1"},
		{"IDLE_TIMEOUT_SECS", "-1"}, {"STREAM_END_TIMEOUT_SECS", "1h"},
		{"UPSTREAM_ENABLED", "maybe"}, {"AUTH_MODE", "ldap"}, {"LOG_LEVEL", "loud"}, {"LOG_FORMAT", "xml"},
	} {
		if _, err := loadConfig(func(k string) string { return map[string]string{tc[0]: tc[1]}[k] }); err == nil || !strings.HasPrefix(err.Error(), tc[0]+":") {
			t.Errorf("%s=%s: error %v, want one naming %s", tc[0], tc[1], err, tc[0])
		}
	}
	_, err := loadConfig(func(k string) string { return map[string]string{"AUTH_MODE": "jwt", "JWT_SECRET": "short"}[k] })
	if err == nil || !strings.HasPrefix(err.Error(), "JWT_SECRET:") || strings.Contains(err.Error(), "short") {
		t.Errorf("short JWT secret: %v", err)
	}
	for env, name := range map[string]string{"PORT=abc": "PORT", "AUTH_MODE=jwt": "JWT_SECRET", "REDIS_URL=http://x": "REDIS_URL"} {
		p := startProcess(t, "wsproxy", t.TempDir(), cleanEnv(env), nil, program(t, "wsproxy"))
		check(t, env+": exit status", p.exitStatus(t), 2)
		if lines := strings.Split(strings.TrimSpace(p.stderr.String()), "\n"); len(lines) != 1 || !strings.Contains(lines[0], name) {
			t.Errorf("%s: stderr %q, want one line naming %s", env, p.stderr, name)
		}
	}
}

// .env is read (a BOM, export, quotes, # a comment only at the start of a
// line), the environment wins over it, and a line that is not KEY=VALUE is
// an error naming the line.
func TestDotEnvThenEnvironment(t *testing.T) {
	path := t.TempDir() + "/.env"
	os.WriteFile(path, []byte("\ufeff# comment\nPORT=9000\nexport LOG_FORMAT=\"text\"\nHOST='127.0.0.2'\n\nAUTH_MODE=none\nALLOWED_ORIGINS=https://a.example # not a comment\n"), 0o600)
	t.Setenv("AUTH_MODE", "redis")
	dotenv, err := readDotEnv(path)
	must(t, err)
	cfg, err := loadConfig(environment(dotenv))
	must(t, err)
	if cfg.Port != 9000 || cfg.LogFormat != "text" || cfg.Host != "127.0.0.2" || cfg.AuthMode != "redis" ||
		!slices.Equal(cfg.AllowedOrigins, []string{"https://a.example # not a comment"}) {
		t.Errorf("got %+v", cfg)
	}
	os.WriteFile(path, []byte("PORT 9000\n"), 0o600)
	if _, err := readDotEnv(path); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("malformed .env: %v", err)
	}
}

// README: Configuration, Operations (Logs): each .env key wsproxy does not
// read (a typo, a wrong case, the first after a BOM) is named in a warning,
// and the start-up record holds the configuration, secrets redacted.
func TestUnknownDotEnvKeysWarnedAndConfigLoggedRedacted(t *testing.T) {
	var files syscall.Rlimit // the hard limit, which the proxy raises its own to
	must(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &files))
	dir := t.TempDir()
	os.WriteFile(dir+"/.env", []byte("\ufeffPROT=9000\nport=9001\nLOG_LEVEL=info\nAUTH_MODE=jwt\nJWT_SECRET="+strings.Repeat("j", 32)+"\n"), 0o600)
	p := startProcess(t, "wsproxy", dir, cleanEnv("HOST=127.0.0.1", "PORT="+strconv.Itoa(freePort(t)),
		"REDIS_URL=redis://user:hunter2@127.0.0.1:1", "MAX_CONNECTIONS="+strconv.FormatUint(min(files.Max, 1<<31-1), 10)), nil, program(t, "wsproxy"))
	var start map[string]any
	warned := map[string]bool{}
	p.waitOutput(t, "the start-up record and three warnings", func(text string) bool {
		for _, rec := range records(text) {
			if rec["msg"] == "starting" {
				start = rec
			} else if v, ok := rec["variable"].(string); ok && rec["level"] == "WARN" {
				warned[v] = true
			}
		}
		return start != nil && len(warned) == 3
	})
	// MAX_CONNECTIONS leaves no file descriptor for the listener and Redis.
	check(t, "warned", warned, map[string]bool{"PROT": true, "port": true, "MAX_CONNECTIONS": true})
	config, ok := start["config"].(map[string]any)
	if !ok || config["PORT"] == nil || config["AUTH_MODE"] != "jwt" || config["JWT_SECRET"] != "REDACTED" || config["REDIS_URL"] != "redis://user:REDACTED@127.0.0.1:1" {
		t.Errorf("config logged as %v", start["config"])
	}
	if strings.Contains(p.out.String(), "hunter2") || strings.Contains(p.out.String(), strings.Repeat("j", 32)) {
		t.Error("a secret appears in the log")
	}
}

// REDIS_URL: the user, password and db are honoured (the fake shares one
// keyspace over its databases).
func TestRedisURLPasswordAndDB(t *testing.T) {
	_, fake := newFake(t)
	fake.RequirePassword("secret")
	tp := startProxy(t, &testRedis{url: "redis://default:secret@" + fake.Addr() + "/3", fake: fake})
	id, token := randomID(), randomID()
	fake.Set("session:"+id+":auth", token)
	c := tp.connect(t, id, token)
	fake.Publish("session:"+id+":down", []byte(`"through AUTH and SELECT"`))
	c.expectText(`"through AUTH and SELECT"`)
	check(t, "SELECTs", fake.CommandCount("SELECT") > 0, true)
}

// ---------------------------------------------------------------------------
// README: Protocol, Endpoints

// Each endpoint answers JSON with its status; another method gets 405 with
// Allow, anything else 404.
func TestEndpoints(t *testing.T) {
	tp := startProxy(t, newTestRedis(t))
	for _, tc := range []struct {
		method, path string
		status       int
		allow, body  string
	}{
		{"GET", "/health", 200, "", `{"active_connections":0,"redis":"connected","status":"healthy"}`},
		{"GET", "/ready", 200, "", `{"status":"ready"}`},
		{"GET", "/nope", 404, "", `"error":"not_found"`},
		{"GET", "/a/ws/b/c", 404, "", `"error":"not_found"`},
		{"POST", "/health", 405, "GET, HEAD", `"error":"method_not_allowed"`},
		{"DELETE", "/metrics", 405, "GET, HEAD", `"error":"method_not_allowed"`},
		{"POST", "/agent/ws/session", 405, "GET", `"error":"method_not_allowed"`},
	} {
		req, _ := http.NewRequest(tc.method, "http://"+tp.addr+tc.path, nil)
		resp, err := httpClient.Do(req)
		must(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.body) || resp.Header.Get("Allow") != tc.allow ||
			resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: %d %s %v, want %d %s, Allow %q, JSON", tc.method, tc.path, resp.StatusCode, body, resp.Header, tc.status, tc.body, tc.allow)
		}
	}
	tp.expectGet(t, "/metrics", 200, "# TYPE wsproxy_active_connections gauge")
}

// /health and /ready answer 503 while Redis is down; when Redis hangs,
// /health answers 503 within about 1 s, so that a probe with a short
// timeout sees 503 rather than its own timeout.
func TestHealthAndReadyReportRedis(t *testing.T) {
	down := startProxy(t, noRedis)
	down.expectGet(t, "/health", 503, `"redis":"disconnected","status":"unhealthy"`)
	down.expectGet(t, "/ready", 503, `"status":"redis_unavailable"`)
	r, fake := newFake(t)
	tp := startProxy(t, r)
	tp.expectGet(t, "/health", 200, `"status":"healthy"`)
	// Probes come seconds apart: by the next one, the pooled connection the
	// last one used has been idle for over a second, and is checked first.
	time.Sleep(1100 * time.Millisecond)
	fake.Freeze(true)
	defer fake.Freeze(false)
	start := time.Now()
	if status, body := tp.getWithin(t, "/health", 5*time.Second); status != 503 || time.Since(start) > 1500*time.Millisecond {
		t.Errorf("/health with Redis hung: %d %s after %v, want 503 within about 1 s", status, body, time.Since(start))
	}
}

// ---------------------------------------------------------------------------
// README: Protocol, Handshake

// The checks come in the README's order (the number in each case), each
// refusing with its status and code, leaving no subscription; no token is
// logged.
func TestHandshakeRefusedInOrderOfChecks(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "ALLOWED_ORIGINS=https://app.example.com, https://other.example.com", "MAX_CONNECTIONS=2")
	id, token := r.session(t)
	plainGET := http.Header{"Authorization": {"Bearer " + token}, "Upgrade": nil, "Connection": nil, "Sec-Websocket-Key": nil, "Sec-Websocket-Version": nil}
	version8 := http.Header{"Authorization": {"Bearer " + token}, "Sec-Websocket-Version": {"8"}}
	for _, tc := range []struct {
		path   string
		header http.Header
		status int
		code   string
	}{
		{"/bad%20agent/ws/" + id, bearer(token), 400, "bad_request"},                 // 1: the agent id
		{"/agent/ws/" + strings.Repeat("a", 129), bearer(token), 400, "bad_request"}, // 1: the session id
		{"/agent/ws/x*y", nil, 400, "bad_request"},                                   // 1 before 5
		{"/agent/ws/" + id, plainGET, 400, "bad_request"},                            // 3: not an upgrade
		{"/agent/ws/" + id, version8, 400, "bad_request"},                            // 3: another version
		{"/agent/ws/" + id, nil, 401, "missing_token"},                               // 5
		{"/agent/ws/nosuchsession", bearer(token), 401, "unknown_session"},           // 6
		{"/agent/ws/" + id, bearer("wrong"), 403, "invalid_token"},                   // 6
		{"/agent/ws/" + id + "?token=wrong", nil, 403, "invalid_token"},              // 6
	} {
		res := tp.expectRefused(t, tc.path, tc.header, tc.status, tc.code)
		if v := res.header.Get("Sec-WebSocket-Version"); tc.header["Sec-Websocket-Version"] != nil && v != "13" {
			t.Errorf("another version: Sec-WebSocket-Version %q, want 13 (RFC 6455 §4.4)", v)
		}
	}
	// 4: an allowed origin gets in, and so does a client without Origin.
	for _, h := range []http.Header{{"Authorization": {"Bearer " + token}, "Origin": {"https://other.example.com"}}, bearer(token)} {
		if c, res := tp.dial(t, "/agent/ws/"+id, h); c == nil {
			t.Fatalf("origin %q: %d %s", h.Get("Origin"), res.status, res.body)
		} else {
			c.conn.Close()
		}
	}
	eventually(t, "no subscription and no slot left", func() bool { return len(sessionChannels(fake)) == 0 && tp.p.slots.Load() == 0 })
	// 2: MAX_CONNECTIONS counts open connections; draining comes first of all.
	tp.connect(t, id, token)
	tp.connect(t, id, token)
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 503, "too_many_connections")
	tp.p.draining.Store(true) // as the first signal does; the Shutdown tests send the signal itself
	tp.expectRefused(t, "/agent/ws/"+id, nil, 503, "draining")
	tp.expectMetrics(t, map[string]float64{handshakes("bad_request"): 5, handshakes("unauthorized"): 2, handshakes("forbidden"): 2, handshakes("rejected"): 2})
	if strings.Contains(tp.logs.String(), token) {
		t.Errorf("a token appears in the logs")
	}
}

// Redis too slow to confirm the subscription: 504 subscribe_timeout, and
// the late confirmation undone; too slow for the token: 504 auth_timeout;
// unreachable: 503 redis_unavailable.
func TestHandshakeRedisFailures(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.3", "SUBSCRIBE_TIMEOUT_SECS=0.3")
	id, token := r.session(t)
	fake.HoldSubscribes(true)
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 504, "subscribe_timeout")
	fake.HoldSubscribes(false)
	r.waitNumSub(t, "session:"+id+":down", 0) // the late confirmation is followed by UNSUBSCRIBE
	fake.Freeze(true)
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 504, "auth_timeout")
	fake.Freeze(false)
	fake.DropConnections()
	fake.RefuseConnections(true)
	eventually(t, "subscriber lost", func() bool { return !tp.p.hub.connected() })
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 503, "redis_unavailable")
	tp.expectMetrics(t, map[string]float64{handshakes("timeout"): 2, handshakes("unavailable"): 1})
}

// A request x/net/websocket refuses after wsproxy's checks (a Host that
// net/http lets through but it cannot parse) is answered 400, its socket
// closed, and leaves nothing.
func TestHandshakeRefusedByLibraryLeavesNothing(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	start := time.Now()
	// A Host x/net/websocket cannot make a URL of, and an Upgrade that
	// strings.EqualFold takes for websocket (U+017F is a long s) but
	// x/net/websocket does not: refused before anything is subscribed.
	tp.expectRefused(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}, "Host": {"%zz"}}, 400, "bad_request")
	tp.expectRefused(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}, "Upgrade": {"webſocket"}}, 400, "bad_request")
	if waited := time.Since(start); waited > 10*time.Second { // the body ends when the socket closes
		t.Errorf("the refused socket stayed open for %v", waited)
	}
	eventually(t, "nothing left", func() bool {
		return len(sessionChannels(fake)) == 0 && tp.p.slots.Load() == 0 && goroutinesIn("wsproxy.(*conn)") == 0
	})
	check(t, "SUBSCRIBEs for the refused handshakes", fake.CommandCount("SUBSCRIBE"), 1) // the keepalive channel's
	tp.expectMetrics(t, map[string]float64{handshakes("bad_request"): 2})
}

// The first message published the moment the handshake completes arrives,
// even when Redis is slow to confirm the subscription.
func TestSubscribedBefore101(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	fake.DelaySubscribes(200 * time.Millisecond)
	for i := 0; i < 5; i++ {
		id, token := r.session(t)
		c := tp.connect(t, id, token)
		check(t, "receivers of a PUBLISH right after 101", r.publish(t, id, `{"first":true}`), 1)
		c.expectText(`{"first":true}`)
	}
}

// A handshake is released by its own SUBSCRIBE's confirmation, not by the
// channel being subscribed already for another connection.
func TestSubscribeWaitsForOwnConfirmation(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	first := tp.connect(t, id, token)
	fake.HoldSubscribes(true)
	second := tp.dialAsync("/agent/ws/"+id, bearer(token))
	eventually(t, "second SUBSCRIBE sent", func() bool { return fake.CommandCount("SUBSCRIBE") >= 2 })
	select {
	case d := <-second:
		t.Fatalf("handshake completed before its confirmation: %d", d.res.status)
	case <-time.After(300 * time.Millisecond):
	}
	fake.HoldSubscribes(false)
	c := (<-second).client(t)
	r.publish(t, id, `"both"`)
	first.expectText(`"both"`)
	c.expectText(`"both"`)
}

// A connection that arrives while the previous connection's UNSUBSCRIBE is
// in flight still ends up subscribed before its 101.
func TestSubscribeWhileUnsubscribeInFlight(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	channel := "session:" + id + ":down"
	old := tp.connect(t, id, token)
	// Withhold replies from here on, so that the UNSUBSCRIBE below stays
	// unanswered while the new SUBSCRIBE is sent.
	fake.HoldSubscribes(true)
	otherID, otherToken := r.session(t)
	tp.dialAsync("/agent/ws/"+otherID, bearer(otherToken))
	eventually(t, "held SUBSCRIBE", func() bool { return fake.Subscribers("session:"+otherID+":down") == 1 })
	old.sendClose(1000)
	eventually(t, "UNSUBSCRIBE sent", func() bool { return fake.Subscribers(channel) == 0 })
	reconnect := tp.dialAsync("/agent/ws/"+id, bearer(token))
	eventually(t, "new SUBSCRIBE sent", func() bool { return fake.Subscribers(channel) == 1 })
	fake.HoldSubscribes(false)
	c := (<-reconnect).client(t)
	check(t, "receivers after the reconnect", r.publish(t, id, `"after"`), 1)
	c.expectText(`"after"`)
}

// Many connections of a few sessions come and go at once; each one is
// subscribed at its 101 and nothing is left subscribed at the end.
func TestSubscribeChurnUnderConcurrency(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	if r.fake != nil {
		r.fake.DelaySubscribes(time.Millisecond)
	}
	var sessions [4][2]string
	for i := range sessions {
		sessions[i][0], sessions[i][1] = r.session(t)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for w := 0; w < 20; w++ {
		wg.Go(func() {
			for i := 0; i < 10; i++ {
				s := sessions[(w+i)%len(sessions)]
				c, res, err := tryDial(nil, tp.addr, "/agent/ws/"+s[0], bearer(s[1]))
				if c == nil {
					errs <- fmt.Errorf("handshake: %d %v", res.status, err)
					return
				}
				if n := r.subscribers("session:" + s[0] + ":down"); n != 1 {
					errs <- fmt.Errorf("open connection, but %d subscribers", n)
				}
				c.conn.Close()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, s := range sessions {
		r.waitNumSub(t, "session:"+s[0]+":down", 0)
	}
	eventually(t, "subscribed_channels back to 0", func() bool { return tp.metric(t, "wsproxy_subscribed_channels") == 0 })
}

// A client that leaves while its handshake waits for Redis (for the
// subscription, or for the token) is counted as aborted, logged at debug,
// and leaves no subscription and no slot.
func TestAbortedHandshakeIsNotARedisFailure(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.5")
	id, token := r.session(t)
	abort := func(waitFor func() bool) {
		t.Helper()
		nc, err := net.Dial("tcp", tp.addr)
		must(t, err)
		fmt.Fprintf(nc, "GET /agent/ws/%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n", id, token)
		eventually(t, "the handshake waiting on Redis", waitFor)
		nc.Close()
	}
	fake.HoldSubscribes(true)
	abort(func() bool { return fake.Subscribers("session:"+id+":down") == 1 })
	eventually(t, "abort counted", func() bool { return tp.metric(t, handshakes("aborted")) == 1 })
	fake.HoldSubscribes(false)
	fake.Freeze(true)
	abort(func() bool { return goroutinesIn("wsproxy.(*proxy).checkRedisToken") == 1 })
	eventually(t, "second abort counted", func() bool { return tp.metric(t, handshakes("aborted")) == 2 })
	fake.Freeze(false)
	eventually(t, "no subscription and no slot left", func() bool { return len(sessionChannels(fake)) == 0 && tp.p.slots.Load() == 0 })
	tp.expectMetrics(t, map[string]float64{handshakes("unavailable"): 0, handshakes("timeout"): 0})
	for _, line := range strings.Split(tp.logs.String(), "\n") {
		if strings.Contains(line, "aborted") && !strings.Contains(line, `"level":"DEBUG"`) {
			t.Errorf("an abort logged above debug: %s", line)
		}
	}
	if !strings.Contains(tp.logs.String(), "handshake aborted") {
		t.Error("no debug record of the abort")
	}
}

// A handshake that fails once it has joined its channel (the client left, or
// Redis did not confirm in time) leaves nothing queued, though messages for
// its session arrived meanwhile: wsproxy_queued_bytes, which the total bound
// reads, returns to 0.
func TestFailedHandshakesLeaveNothingQueued(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "SUBSCRIBE_TIMEOUT_SECS=0.5")
	id, token := r.session(t)
	channel := "session:" + id + ":down"
	fake.HoldSubscribes(true)
	defer fake.HoldSubscribes(false)
	handshake := func() net.Conn {
		t.Helper()
		nc, err := net.Dial("tcp", tp.addr)
		must(t, err)
		t.Cleanup(func() { nc.Close() })
		fmt.Fprintf(nc, "GET /agent/ws/%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n", id, token)
		eventually(t, "the handshake waiting for its subscription", func() bool { return fake.Subscribers(channel) == 1 })
		for range 3 { // as the Redis reader dispatches messages that arrive meanwhile
			tp.p.hub.dispatch(channel, []byte(`"meanwhile"`), time.Now().UnixNano())
		}
		if tp.p.metrics.queuedBytes.Load() == 0 {
			t.Fatal("nothing queued for the handshake")
		}
		return nc
	}
	handshake().Close()
	eventually(t, "the abort counted", func() bool { return tp.metric(t, handshakes("aborted")) == 1 })
	eventually(t, "nothing queued after the abort", func() bool { return tp.p.metrics.queuedBytes.Load() == 0 })
	eventually(t, "unsubscribed", func() bool { return fake.Subscribers(channel) == 0 })
	response, err := http.ReadResponse(bufio.NewReader(handshake()), nil)
	must(t, err)
	body, _ := io.ReadAll(response.Body)
	if response.StatusCode != 504 || !bytes.Contains(body, []byte("subscribe_timeout")) {
		t.Errorf("answer: %d %s, want 504 subscribe_timeout", response.StatusCode, body)
	}
	check(t, "queued after the subscribe timeout", tp.p.metrics.queuedBytes.Load(), int64(0))
}

// What is queued for handshakes waiting on Redis counts against
// MAX_TOTAL_BUFFER_BYTES too: past it, a handshake is closed with 1008 as
// soon as it opens instead of queueing more.
func TestHandshakeBacklogIsBoundedByTheTotal(t *testing.T) {
	const bound = 1 << 20
	r, fake := newFake(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES="+strconv.Itoa(bound), "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := r.session(t)
	channel := "session:" + id + ":down"
	fake.HoldSubscribes(true)
	first, second := tp.dialAsync("/agent/ws/"+id, bearer(token)), tp.dialAsync("/agent/ws/"+id, bearer(token))
	eventually(t, "two handshakes waiting for their subscription", func() bool {
		tp.p.hub.mu.Lock()
		defer tp.p.hub.mu.Unlock()
		return len(tp.p.hub.channels[channel]) == 2
	})
	message := []byte(`"` + strings.Repeat("h", 100000) + `"`)
	for range 30 { // 3 MB: each handshake alone would take 1 MiB of it
		tp.p.hub.dispatch(channel, message, time.Now().UnixNano())
		if q := tp.p.metrics.queuedBytes.Load(); q > bound+int64(len(message)+frameOverhead) {
			t.Fatalf("%d bytes queued for handshakes, over the bound of %d plus a message", q, bound)
		}
	}
	fake.HoldSubscribes(false)
	codes := map[int]int{}
	for _, d := range []dialed{<-first, <-second} {
		c := d.client(t)
		for {
			f, err := c.next(5 * time.Second)
			if err != nil {
				t.Fatalf("no close frame: %v", err)
			}
			if f.op == opClose {
				codes[closeCode(f.payload)]++
				break
			}
		}
	}
	check(t, "a handshake closed 1008", codes[1008] >= 1, true)
	eventually(t, "nothing queued", func() bool { return tp.p.metrics.queuedBytes.Load() == 0 })
}

// ---------------------------------------------------------------------------
// README: Protocol, Handshake (How a refusal is answered): refusals a
// browser can read

// For a request with an Origin header, a
// completed handshake closed at once with 4000 + status, the code as the
// reason, the TCP connection closed after the client's answer; an invalid
// upgrade is still HTTP 400. Counted and logged as HTTP refusals are, and
// nothing stays subscribed.
func TestBrowserRefusalIsClose4000PlusStatus(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "ALLOWED_ORIGINS=https://app.example.com", "MAX_CONNECTIONS=2", "SUBSCRIBE_TIMEOUT_SECS=0.3")
	id, token := r.session(t)
	browser := http.Header{"Origin": {"https://app.example.com"}}
	for path, want := range map[string]string{
		"/agent/ws/x*y":                          "4400 bad_request",
		"/agent/ws/" + id:                        "4401 missing_token",
		"/agent/ws/nosuchsession?token=" + token: "4401 unknown_session",
		"/agent/ws/" + id + "?token=wrong":       "4403 invalid_token",
	} {
		check(t, path, refusedWith(t, tp, path, browser), want)
	}
	check(t, "a bad origin, before a missing token", refusedWith(t, tp, "/agent/ws/"+id, http.Header{"Origin": {"https://evil.example.com"}}), "4403 origin_not_allowed")
	res := tp.expectRefused(t, "/agent/ws/"+id, http.Header{"Origin": browser["Origin"], "Sec-Websocket-Version": {"8"}}, 400, "bad_request")
	check(t, "Sec-WebSocket-Version", res.header.Get("Sec-WebSocket-Version"), "13")
	fake.HoldSubscribes(true)
	check(t, "withheld confirmation", refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser), "4504 subscribe_timeout")
	fake.HoldSubscribes(false)
	tp.connect(t, id, token)
	tp.connect(t, id, token)
	check(t, "at MAX_CONNECTIONS", refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser), "4503 too_many_connections")
	tp.expectMetrics(t, map[string]float64{handshakes("bad_request"): 2, handshakes("unauthorized"): 2, handshakes("forbidden"): 2,
		handshakes("timeout"): 1, handshakes("rejected"): 1})
	check(t, "refusals logged", strings.Count(tp.logs.String(), `"msg":"handshake refused"`), 8)
	r.waitNumSub(t, "session:"+id+":down", 1) // the two open connections
	tp.p.draining.Store(true)
	check(t, "draining", refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser), "4503 draining")
	down := startProxy(t, noRedis, "AUTH_MODE=none")
	check(t, "Redis down", refusedWith(t, down, "/agent/ws/s", http.Header{"Origin": {"http://localhost"}}), "4503 redis_unavailable")
}

// refusedWith dials path with header, which carries an Origin, answers the
// close frame of the completed-then-refused handshake, and returns its
// "code reason"; it fails the test on an HTTP answer, or unless the proxy
// then closes the TCP connection and releases the slot.
func refusedWith(t *testing.T, tp *testProxy, path string, header http.Header) string {
	t.Helper()
	c, res := tp.dial(t, path, header)
	if c == nil {
		t.Fatalf("%s: HTTP %d %s, want 101 and a close frame", path, res.status, res.body)
	}
	f, err := c.readFrame(5 * time.Second)
	if err != nil || f.op != opClose {
		t.Fatalf("%s: %v, opcode %d, want a close frame at once", path, err, f.op)
	}
	c.writeFrame(true, opClose, f.payload[:2])
	if _, err := c.readFrame(5 * time.Second); err != io.EOF {
		t.Errorf("%s: after the close handshake: %v, want EOF", path, err)
	}
	c.conn.Close() // as a browser does once the server has closed its side
	eventually(t, "the refused handshake's slot released", func() bool { return tp.p.slots.Load() == tp.p.metrics.active.Load() })
	return fmt.Sprintf("%d %s", closeCode(f.payload), f.payload[2:])
}

// ---------------------------------------------------------------------------
// README: Protocol, Authentication

// redis: the key's TTL becomes AUTH_GRACE_PERIOD_SECS at connect and again
// at disconnect, and the token works again within it.
func TestRedisTokenKeptForGracePeriod(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=120")
	id, token := r.session(t) // stored with EX 600
	ttl := func() int { n, _ := redis.Int(r.do(t, "TTL", "session:"+id+":auth"), nil); return n }
	c := tp.connect(t, id, token)
	if n := ttl(); n <= 0 || n > 120 {
		t.Errorf("TTL after connect %d, want the grace period 120", n)
	}
	r.do(t, "EXPIRE", "session:"+id+":auth", 600)
	c.sendClose(1000)
	c.expectClose(5 * time.Second)
	eventually(t, "TTL restarted at disconnect", func() bool { n := ttl(); return n > 0 && n <= 120 })
	tp.connect(t, id, token)
}

// redis, AUTH_GRACE_PERIOD_SECS=0: the key is deleted on use, the token
// then unknown.
func TestSingleUseTokenDeletedOnUse(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=0")
	id, token := r.session(t)
	tp.connect(t, id, token)
	check(t, "the single-use key", r.do(t, "GET", "session:"+id+":auth"), nil)
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 401, "unknown_session")
}

// The token in Authorization with the scheme in any case (RFC 7235 §2.1),
// or ?token= as browsers send it.
func TestTokenInBearerHeaderAnyCaseOrQuery(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	for _, h := range []http.Header{{"Authorization": {"bearer " + token}}, {"Authorization": {"BEARER " + token}}, bearer(token)} {
		if c, res := tp.dial(t, "/agent/ws/"+id, h); c == nil {
			t.Errorf("%s: %d %s", h.Get("Authorization")[:6], res.status, res.body)
		}
	}
	if c, res := tp.dial(t, "/agent/ws/"+id+"?token="+token, nil); c == nil {
		t.Errorf("?token=: %d %s", res.status, res.body)
	}
}

// jwt: HS256 with the path's session_id; exp and nbf honoured; any other
// alg, none included, refused.
func TestJWT(t *testing.T) {
	secret := strings.Repeat("s", 32)
	tp := startProxy(t, newTestRedis(t), "AUTH_MODE=jwt", "JWT_SECRET="+secret)
	hs, now := map[string]any{"alg": "HS256", "typ": "JWT"}, time.Now().Unix()
	unsigned := strings.TrimRight(makeJWT(secret, map[string]any{"alg": "none"}, map[string]any{"session_id": "s1"}), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") + "."
	for _, tc := range []struct {
		name, token string
		status      int
		code        string
	}{
		{"valid", makeJWT(secret, hs, map[string]any{"session_id": "s1", "exp": now + 60, "nbf": now - 1}), 101, ""},
		{"no exp", makeJWT(secret, hs, map[string]any{"session_id": "s1"}), 101, ""},
		{"expired", makeJWT(secret, hs, map[string]any{"session_id": "s1", "exp": now - 1}), 403, "token_expired"},
		{"not yet valid", makeJWT(secret, hs, map[string]any{"session_id": "s1", "nbf": now + 60}), 403, "token_not_yet_valid"},
		{"other session", makeJWT(secret, hs, map[string]any{"session_id": "s2"}), 403, "session_mismatch"},
		{"wrong secret", makeJWT(strings.Repeat("x", 32), hs, map[string]any{"session_id": "s1"}), 403, "invalid_token"},
		{"alg none", unsigned, 403, "invalid_token"},
		{"alg HS512", makeJWT(secret, map[string]any{"alg": "HS512"}, map[string]any{"session_id": "s1"}), 403, "invalid_token"},
		{"garbage", "not.a.jwt", 403, "invalid_token"},
		{"missing", "", 401, "missing_token"},
	} {
		header := bearer(tc.token)
		if tc.token == "" {
			header = nil
		}
		if c, res := tp.dial(t, "/agent/ws/s1", header); res.status != tc.status || res.code != tc.code {
			t.Errorf("%s: %d %s, want %d %s", tc.name, res.status, res.body, tc.status, tc.code)
		} else if c != nil {
			c.conn.Close()
		}
	}
}

// none: any client gets in, and a warning is logged at start-up.
func TestAuthNoneAcceptsAnyoneAndWarns(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_MODE=none")
	c := tp.connect(t, "anything", "")
	r.publish(t, "anything", `{"ok":true}`)
	c.expectText(`{"ok":true}`)
	if !strings.Contains(tp.logs.String(), "AUTH_MODE=none") {
		t.Errorf("no start-up warning for AUTH_MODE=none")
	}
}

// ---------------------------------------------------------------------------
// README: Protocol, Messages

// Down: every message goes to every connection of its session and to no
// other, byte for byte, in publish order, as text, or as binary when it is
// not UTF-8; a delivery is counted per connection.
func TestDownDeliveredInOrderByteForByte(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	a, b := tp.connect(t, id, token), tp.connect(t, id, token)
	other, otherToken := r.session(t)
	bystander := tp.connect(t, other, otherToken)
	messages := []string{`{"type":"data","payload":"héllo ✓"}`, "not json at all", strings.Repeat("x", 70000), "", `{"n":4}`}
	for i := 0; i < 200; i++ {
		messages = append(messages, fmt.Sprintf(`{"seq":%d}`, i))
	}
	for _, m := range messages {
		r.publish(t, id, m)
	}
	for _, c := range []*wsClient{a, b} {
		for _, want := range messages {
			c.expectText(want)
		}
	}
	r.publish(t, other, `"only for the bystander"`)
	bystander.expectText(`"only for the bystander"`)
	eventually(t, "down count", func() bool {
		return tp.metric(t, `wsproxy_messages_total{direction="down"}`) == float64(2*len(messages)+1)
	})
	payload := string([]byte{0xff, 0x00, 0xfe, 'a'})
	r.publish(t, other, payload)
	f := bystander.read()
	check(t, "not UTF-8", []any{f.op, string(f.payload)}, []any{byte(opBinary), payload})
}

// Down, a burst larger than the socket buffers: the writer takes large
// batches while the dispatcher keeps queueing, and every message still
// arrives intact and in order.
func TestDownBurstKeepsOrder(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	rc, err := redis.DialURL(r.url)
	must(t, err)
	defer rc.Close()
	const n = 8000
	message := func(i int) string { return fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, strings.Repeat("p", 1000)) }
	for i := 0; i < n; i++ {
		rc.Send("PUBLISH", "session:"+id+":down", message(i))
	}
	must(t, rc.Flush())
	for i := 0; i < n; i++ {
		_, err := rc.Receive()
		must(t, err)
	}
	for i := 0; i < n; i++ {
		c.expectText(message(i))
	}
}

// Up: valid JSON text is published unchanged, in order; a message split
// over fragments (as browsers split those over about 128 KiB), a ping
// between them, is reassembled first, and the ping answered.
func TestUpPublishedInOrderAfterReassembly(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_MESSAGE_SIZE_BYTES=300000")
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	sent := []string{`{"a":1}`, ` [1, 2, "ü"] `, `"just a string"`}
	for _, m := range sent {
		c.sendText(m)
	}
	big := `{"big":"` + strings.Repeat("y", 200000) + `"}`
	c.writeFrame(false, opText, []byte(big[:70000]))
	c.writeFrame(true, opPing, []byte("between"))
	c.writeFrame(false, opContinuation, []byte(big[70000:140000]))
	c.writeFrame(true, opContinuation, []byte(big[140000:]))
	for _, want := range append(sent, big) {
		expectMessage(t, up, want)
	}
	f, err := c.readFrame(5 * time.Second)
	check(t, "the answer to the ping", []any{err, f.op, string(f.payload)}, []any{nil, byte(opPong), "between"})
	eventually(t, "up count", func() bool { return tp.metric(t, `wsproxy_messages_total{direction="up"}`) == 4 })
}

// Up: what cannot be published is answered with a control error, counted
// by code, and the connection stays open.
func TestUpControlErrorsKeepConnectionOpen(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "MAX_MESSAGE_SIZE_BYTES=1000")
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	c.sendText(`{"unterminated":`)
	c.expectControlError("invalid_json")
	c.writeFrame(true, opBinary, []byte(`{"a":1}`))
	c.expectControlError("binary_not_supported")
	c.sendText(`"` + strings.Repeat("z", 1000) + `"`)
	c.expectControlError("message_too_large")
	// Too large only across fragments: answered once, for the whole message
	// (what comes next is published, not answered).
	c.writeFrame(false, opText, []byte(`"`+strings.Repeat("z", 600)))
	c.writeFrame(false, opContinuation, []byte(strings.Repeat("z", 600)))
	c.writeFrame(true, opContinuation, []byte(strings.Repeat("z", 600)+`"`))
	c.expectControlError("message_too_large")
	c.sendText(`{"still":"open"}`)
	expectMessage(t, up, `{"still":"open"}`)
	// Redis refuses a PUBLISH: publish_failed, and the next goes through.
	fake.FailPublish("READONLY You can't write against a read only replica")
	c.sendText(`{"lost":true}`)
	c.expectControlError("publish_failed")
	fake.FailPublish("")
	c.sendText(`{"after":"failure"}`)
	expectMessage(t, up, `{"after":"failure"}`)
	tp.expectMetrics(t, map[string]float64{`wsproxy_client_errors_total{code="invalid_json"}`: 1, `wsproxy_client_errors_total{code="binary_not_supported"}`: 1,
		`wsproxy_client_errors_total{code="message_too_large"}`: 2, `wsproxy_client_errors_total{code="publish_failed"}`: 1})
}

// UPSTREAM_ENABLED=false: client messages are answered upstream_disabled
// and not published; down still works.
func TestUpstreamDisabled(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "UPSTREAM_ENABLED=false")
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	c.sendText(`{"a":1}`)
	c.expectControlError("upstream_disabled")
	r.publish(t, id, `"down still works"`)
	c.expectText(`"down still works"`)
	expectNothing(t, up, 100*time.Millisecond)
}

// README: Close codes, 1002 (RFC 6455 §5.1, §5.2, §5.4, §5.5): a frame
// that breaks the protocol fails its connection with 1002 and nothing is
// published; a length just below 2^63 is read (and discarded) without
// overflowing the size arithmetic; everyone else is served meanwhile.
func TestProtocolErrorsClose1002(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	up := r.up(t, id)
	for name, write := range map[string]func(c *wsClient){
		"continuation without a message": func(c *wsClient) { c.writeFrame(true, opContinuation, []byte("no message to continue")) },
		"unmasked frame":                 func(c *wsClient) { c.conn.Write([]byte{0x81, 2, '{', '}'}) },
		"reserved bit":                   func(c *wsClient) { c.writeFrame(true, opText|0x40, []byte("{}")) },
		"reserved opcode":                func(c *wsClient) { c.writeFrame(true, 0x3, []byte("{}")) },
		"fragmented ping":                func(c *wsClient) { c.writeFrame(false, opPing, nil) },
		"long ping":                      func(c *wsClient) { c.writeFrame(true, opPing, make([]byte, 126)) },
		"length with its top bit set": func(c *wsClient) {
			c.conn.Write(append(encodeHeader(true, opText, 1<<63|7, true), mask([]byte(`{"a":1}`))...))
		},
	} {
		c := tp.connect(t, id, token)
		write(c)
		if code, _ := c.expectClose(5 * time.Second); code != 1002 {
			t.Errorf("%s: close %d, want 1002", name, code)
		}
	}
	c := tp.connect(t, id, token)
	c.writeFrame(false, opText, []byte(`{"a":`))
	c.conn.Write(append(encodeHeader(true, opContinuation, 1<<63-1, true), make([]byte, 4096)...))
	if f, err := c.readFrame(300 * time.Millisecond); err == nil {
		t.Errorf("a huge claim was answered with opcode %d %q", f.op, f.payload)
	}
	expectNothing(t, up, 200*time.Millisecond)
	other := tp.connect(t, id, token)
	r.publish(t, id, `"fine"`)
	other.expectText(`"fine"`)
}

// RFC 6455 §8.1: a text message that is not UTF-8, whole or across
// fragments, or a close reason that is not, fails the connection with 1007
// and nothing is published. UTF-8 that is not JSON is only a control
// error, and a character split between fragments is fine.
func TestInvalidUTF8Closes1007(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	c.sendText("not json")
	c.expectControlError("invalid_json")
	c.writeFrame(false, opText, []byte(`"split `+"\xc3"))
	c.writeFrame(true, opContinuation, []byte("\xbc"+`"`))
	expectMessage(t, up, `"split ü"`)
	for name, write := range map[string]func(c *wsClient){
		"whole message": func(c *wsClient) { c.sendText("\"\xff\"") },
		"across fragments": func(c *wsClient) {
			c.writeFrame(false, opText, []byte(`"ok so far`))
			c.writeFrame(true, opContinuation, []byte("\xed\xa0\x80\"")) // a surrogate
		},
		"close reason": func(c *wsClient) { c.writeFrame(true, opClose, append(binary.BigEndian.AppendUint16(nil, 1000), 0xff)) },
	} {
		c := tp.connect(t, id, token)
		write(c)
		if code, _ := c.expectClose(5 * time.Second); code != 1007 {
			t.Errorf("%s: close %d, want 1007", name, code)
		}
	}
	expectNothing(t, up, 200*time.Millisecond)
}

// README: Close codes: a client's close frame is echoed with its code, or
// with 1002 for a code that may not be sent (RFC 6455 §7.4.1).
func TestClientCloseIsEchoed(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	c.sendClose(4000)
	c.expectCloseCode(4000)
	eventually(t, "connection gone", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	c = tp.connect(t, id, token)
	c.sendClose(1005)
	c.expectCloseCode(1002)
}

// IDLE_TIMEOUT_SECS: data either way keeps a connection open past the
// timeout; then it is closed with 1000.
func TestIdleTimeout(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "IDLE_TIMEOUT_SECS=0.5")
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	start := time.Now()
	for i := 0; i < 4; i++ {
		time.Sleep(200 * time.Millisecond) // the time that passes is what is tested
		if i%2 == 0 {
			c.sendText(`{"keep":"alive"}`)
			<-up
		} else {
			r.publish(t, id, `"tick"`)
			c.readText()
		}
	}
	c.expectCloseCode(1000)
	if elapsed := time.Since(start); elapsed < 1100*time.Millisecond {
		t.Errorf("closed after %v despite traffic", elapsed)
	}
}

// STREAM_END_TIMEOUT_SECS: a stream_end is forwarded as is, and the
// connection closed with 1000 that long after it, unless data followed (a
// new stream began).
func TestStreamEndTimeout(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "STREAM_END_TIMEOUT_SECS=0.4")
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	end := `{"type":"control","command":"stream_end","reason":"done"}`
	r.publish(t, id, end)
	c.expectText(end)
	time.Sleep(200 * time.Millisecond) // the time that passes is what is tested
	r.publish(t, id, `"new stream"`)
	c.readText()
	time.Sleep(400 * time.Millisecond)
	r.publish(t, id, `"still open"`)
	c.expectText(`"still open"`)
	start := time.Now()
	r.publish(t, id, end)
	c.readText()
	c.expectCloseCode(1000)
	if elapsed := time.Since(start); elapsed < 350*time.Millisecond {
		t.Errorf("closed %v after stream_end", elapsed)
	}
}

// ---------------------------------------------------------------------------
// README: Protocol, Liveness

// A client from which nothing is read for interval + timeout is dropped
// without a close handshake; one that answers pings but sends no data stays.
func TestSilentClientDroppedAnsweringClientKept(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "WS_PING_INTERVAL_SECS=0.2", "WS_PING_TIMEOUT_SECS=0.2")
	id, token := r.session(t)
	silent, answering := tp.connect(t, id, token), tp.connect(t, id, token)
	silent.autoPong = false
	answered := make(chan error, 1)
	go func() { // the answering client reads, and so answers pings, for many intervals
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			if f, err := answering.next(time.Until(deadline)); err == nil {
				answered <- fmt.Errorf("answering client got opcode %d", f.op)
				return
			} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
				answered <- fmt.Errorf("answering client closed: %v", err)
				return
			}
		}
		answered <- nil
	}()
	start := time.Now()
	if code, _ := silent.expectClose(5 * time.Second); code != 1006 { // it reads pings, never answers
		t.Errorf("silent client: close %d, want the connection dropped (1006)", code)
	}
	if elapsed := time.Since(start); silent.pings == 0 || elapsed < 300*time.Millisecond {
		t.Errorf("closed after %v and %d pings, before interval+timeout", elapsed, silent.pings)
	}
	must(t, <-answered)
	if answering.pings < 5 {
		t.Errorf("answering client saw %d pings", answering.pings)
	}
	r.publish(t, id, `"alive"`)
	answering.expectText(`"alive"`)
}

// The first ping goes out one WS_PING_INTERVAL_SECS after the open, so a
// burst of connections is not followed by a burst of pings.
func TestFirstPingOneIntervalAfterOpen(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "WS_PING_INTERVAL_SECS=0.8")
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	opened := time.Now()
	f, err := c.readFrame(5 * time.Second)
	check(t, "a ping", []any{err, f.op}, []any{nil, byte(opPing)})
	if after := time.Since(opened); after < 600*time.Millisecond {
		t.Errorf("first ping %v after the open, want one interval (800 ms)", after)
	}
}

// ---------------------------------------------------------------------------
// README: Protocol, Close codes
//
// Each code is proved where it arises: 1000 by TestIdleTimeout and
// TestStreamEndTimeout, 1001 by the Shutdown tests, 1002 and 1007 by
// TestProtocolErrorsClose1002 and TestInvalidUTF8Closes1007, the echo by
// TestClientCloseIsEchoed, 1008 in Limits and abuse, 4400-4599 by
// TestBrowserRefusalIsClose4000PlusStatus, the dropped connection by
// TestSilentClientDroppedAnsweringClientKept, and that a close follows the
// queue by TestCloseGoesOutAfterQueuedFrames.

// ---------------------------------------------------------------------------
// README: Operations (Logs, Metrics)

// One JSON record per event: open, close (with conn, reason, duration and
// the counts) and refusals carry the session and agent ids; start-up
// carries the configuration; secrets and tokens never appear.
func TestLogsAreStructuredAndCarryIDs(t *testing.T) {
	secret := strings.Repeat("k", 40)
	tp := startProxy(t, newTestRedis(t), "AUTH_MODE=jwt", "JWT_SECRET="+secret)
	token := makeJWT(secret, map[string]any{"alg": "HS256"}, map[string]any{"session_id": "logged"})
	c := tp.connect(t, "logged", token)
	c.sendClose(1000)
	c.expectClose(5 * time.Second)
	tp.dial(t, "/agent-1/ws/logged", bearer("forged-"+token))
	tp.waitLog(t, "the close record", func(rec map[string]any) bool { return rec["msg"] == "connection closed" })
	seen := map[string]map[string]any{}
	lines := strings.Split(strings.TrimSpace(tp.logs.String()), "\n")
	for _, rec := range records(tp.logs.String()) {
		seen[rec["msg"].(string)] = rec
	}
	check(t, "JSON records", len(records(tp.logs.String())), len(lines))
	for _, msg := range []string{"connection open", "connection closed", "handshake refused"} {
		if rec := seen[msg]; rec == nil || rec["session_id"] != "logged" || rec["agent_id"] != "agent-1" {
			t.Errorf("%s: %v", msg, rec)
		}
	}
	if rec := seen["connection closed"]; rec["conn"] == nil || rec["reason"] == nil || rec["duration"] == nil || rec["messages_down"] == nil || rec["messages_up"] == nil {
		t.Errorf("close record lacks fields: %v", rec)
	}
	if start := seen["starting"]; start == nil || start["config"] == nil {
		t.Errorf("no start-up record with the configuration")
	}
	if logs := tp.logs.String(); strings.Contains(logs, secret) || strings.Contains(logs, token[:20]) {
		t.Errorf("a secret or token appears in the logs")
	}
}

// /metrics lists every series of the README's table.
func TestMetricsExposeEverySeries(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	r.publish(t, id, `"x"`)
	c.readText()
	// The writer counts after its write returns, so possibly after the read.
	eventually(t, "delivery counted", func() bool { return tp.metric(t, "wsproxy_delivery_latency_seconds_count") == 1 })
	_, body := tp.getWithin(t, "/metrics", 5*time.Second)
	for _, series := range []string{
		"wsproxy_active_connections 1", handshakes("accepted") + " 1",
		`wsproxy_messages_total{direction="down"} 1`, `wsproxy_bytes_total{direction="down"} 3`,
		`wsproxy_messages_total{direction="up"} 0`, `wsproxy_client_errors_total{code="invalid_json"} 0`,
		`wsproxy_slow_client_closes_total{limit="connection"} 0`, `wsproxy_slow_client_closes_total{limit="total"} 0`,
		"wsproxy_queued_bytes 0", "wsproxy_redis_connected 1", "wsproxy_redis_reconnects_total 0",
		"wsproxy_subscribed_channels 1", `wsproxy_delivery_latency_seconds_bucket{le="+Inf"} 1`,
		"wsproxy_delivery_latency_seconds_count 1", "# TYPE wsproxy_delivery_latency_seconds histogram",
		"process_resident_memory_bytes ", "go_goroutines ", "process_cpu_seconds_total ",
		"go_memstats_heap_inuse_bytes ", "go_memstats_stack_inuse_bytes ",
	} {
		if !strings.Contains("\n"+body, "\n"+series) {
			t.Errorf("missing %q", series)
		}
	}
}

// ---------------------------------------------------------------------------
// README: Limits and abuse

// A frame header that claims MAX_MESSAGE_SIZE_BYTES costs what arrived,
// not what it claims: 200 such connections, whole or after a first fragment.
func TestClaimedLengthCostsNoMemory(t *testing.T) {
	for _, fragmented := range []bool{false, true} {
		t.Run(map[bool]string{false: "one frame", true: "after a fragment"}[fragmented], func(t *testing.T) {
			tp := startProxy(t, newTestRedis(t), "AUTH_MODE=none")
			before := liveHeap()
			const n, limit = 200, 1 << 20
			for i := 0; i < n; i++ {
				c := tp.connect(t, "claim", "")
				if fragmented {
					c.writeFrame(false, opText, []byte(`"`+strings.Repeat("f", 4095)))
					c.conn.Write(encodeHeader(true, opContinuation, limit-4096, true))
				} else {
					c.conn.Write(encodeHeader(true, opText, limit, true))
				}
			}
			eventually(t, "every claim read", func() bool { return goroutinesIn("wsproxy.(*conn).readPayload") == n })
			if grown := liveHeap() - before; grown > 40<<20 {
				t.Errorf("%d claims of %d bytes grew the heap by %d MiB", n, limit, grown>>20)
			} else {
				t.Logf("%d claims of %d bytes grew the heap by %.1f MiB", n, limit, float64(grown)/(1<<20))
			}
		})
	}
}

// Plain HTTP: an idle keep-alive connection is closed, and a request must
// arrive in time; an upgraded WebSocket keeps none of those deadlines.
// MAX_TOTAL_BUFFER_BYTES bounds the buffers of client messages being
// reassembled, all together: past it, the clients that have been sending
// their message the longest are closed (1008 message too slow), and a
// client that sends at once is served.
func TestInboundMessagesBoundedByTheTotal(t *testing.T) {
	const bound = 1 << 20
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := r.session(t)
	up := r.up(t, id)
	var tricklers []*wsClient
	for i := range 4 { // each holds 400 KB of a 900 KB message: 1.6 MB together
		c := tp.connect(t, id, token)
		c.conn.Write(append(encodeHeader(true, opText, 900000, true), mask(bytes.Repeat([]byte(" "), 400000))...))
		tricklers = append(tricklers, c)
		eventually(t, "the message buffered", func() bool {
			return tp.p.metrics.inboundBytes.Load() >= int64(min(i+1, 2)*400000) || tp.metric(t, `wsproxy_slow_client_closes_total{limit="inbound"}`) > 0
		})
	}
	eventually(t, "a sender closed for the total, and the rest within it", func() bool {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="inbound"}`) >= 1 && tp.p.metrics.inboundBytes.Load() <= bound
	})
	holdsFor(t, 300*time.Millisecond, func() {
		if held := tp.p.metrics.inboundBytes.Load(); held > bound+256<<10 { // a reader still reading may grow once before it sheds
			t.Fatalf("%d bytes held for client messages, over the bound of %d", held, bound)
		}
	})
	tricklers[0].expectShed("message too slow") // the one sending the longest
	if closes := tp.metric(t, `wsproxy_slow_client_closes_total{limit="inbound"}`); closes > float64(len(tricklers)) {
		t.Errorf("%v closes counted for %d senders", closes, len(tricklers))
	}
	prompt := tp.connect(t, id, token)
	prompt.sendText(`{"prompt":"hi"}`)
	expectMessage(t, up, `{"prompt":"hi"}`)
	for _, c := range tricklers {
		c.conn.Close()
	}
	eventually(t, "nothing held", func() bool { return tp.p.metrics.inboundBytes.Load() == 0 })
}

// A whole message waiting for Redis to take its PUBLISH still counts
// against the bound on client messages, but its client is no slow sender:
// a trickler that passes the bound is shed, not the client that sent at once.
func TestMessageWaitingToBePublishedIsNotShed(t *testing.T) {
	const bound = 1 << 20
	r, fake := newFake(t)
	tp := startProxy(t, r, "AUTH_MODE=none", "MAX_BUFFER_SIZE_BYTES=65536", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := randomID(), ""
	up := r.up(t, id)
	waiting, trickler := tp.connect(t, id, token), tp.connect(t, id, token)
	fake.Freeze(true)
	message := `"` + strings.Repeat("w", 600000) + `"`
	waiting.sendText(message)
	eventually(t, "the message counted while it waits", func() bool { return tp.p.metrics.inboundBytes.Load() >= 600000 })
	trickler.conn.Write(append(encodeHeader(true, opText, 900000, true), mask(bytes.Repeat([]byte(" "), 500000))...))
	eventually(t, "a sender shed", func() bool { return tp.metric(t, `wsproxy_slow_client_closes_total{limit="inbound"}`) >= 1 })
	fake.Freeze(false)
	expectMessage(t, up, message)
	waiting.sendText(`{"still":"open"}`)
	expectMessage(t, up, `{"still":"open"}`)
	check(t, "senders shed", tp.metric(t, `wsproxy_slow_client_closes_total{limit="inbound"}`), 1.0)
}

func TestHTTPIdleAndRequestTimeouts(t *testing.T) {
	defer func(idle, request time.Duration) { httpIdleTimeout, httpRequestTimeout = idle, request }(httpIdleTimeout, httpRequestTimeout)
	httpIdleTimeout, httpRequestTimeout = 300*time.Millisecond, 300*time.Millisecond
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.2", "SUBSCRIBE_TIMEOUT_SECS=0.2") // writes bounded by 0.7 s
	id, token := r.session(t)
	ws := tp.connect(t, id, token)
	up := r.up(t, id)
	closedAfter := func(request string) time.Duration {
		t.Helper()
		nc, err := net.Dial("tcp", tp.addr)
		must(t, err)
		defer nc.Close()
		start := time.Now()
		io.WriteString(nc, request)
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if strings.HasSuffix(request, "\r\n\r\n") {
			resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("%q: %v", request, err)
			}
			io.Copy(io.Discard, resp.Body)
			start = time.Now()
			if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("idle keep-alive connection: %v, want EOF", err)
			}
		} else if _, err := io.ReadAll(nc); err != nil {
			t.Fatalf("stalled request: %v, want it closed", err)
		}
		return time.Since(start)
	}
	if d := closedAfter("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"); d < 200*time.Millisecond || d > 2*time.Second {
		t.Errorf("idle keep-alive connection closed after %v, want about 300 ms", d)
	}
	if d := closedAfter("GET /health HTTP/1.1\r\nHost: x\r\n"); d > 2*time.Second {
		t.Errorf("an unfinished request held its connection for %v", d)
	}
	time.Sleep(time.Second) // the WebSocket outlives every one of those deadlines, both ways
	r.publish(t, id, `"still here"`)
	ws.expectText(`"still here"`)
	ws.sendText(`{"up":"too"}`)
	expectMessage(t, up, `{"up":"too"}`)
}

// A client whose queue would pass MAX_BUFFER_SIZE_BYTES is closed with
// 1008, after a warning at 80 %, without slowing the others.
func TestSlowClientClosed1008WithoutSlowingOthers(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536")
	id, token := r.session(t)
	slow, fast := tp.connect(t, id, token), tp.connect(t, id, token)
	// The slow client never reads, so the kernel's buffers fill, then its
	// queue; the fast one gets every message meanwhile.
	message := `"` + strings.Repeat("m", 4094) + `"`
	for i := 0; tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`) == 0; i++ {
		if i == 20000 {
			t.Fatal("80 MB published and the slow client is still open")
		}
		r.publish(t, id, message)
		fast.expectText(message)
	}
	slow.expectShed() // 1008, or at once when a frame is half-written to it
	r.publish(t, id, `"after"`)
	fast.expectText(`"after"`)
	if !strings.Contains(tp.logs.String(), "client is falling behind") {
		t.Errorf("no 80%% warning in the logs")
	}
}

// MAX_TOTAL_BUFFER_BYTES bounds all queues together: clients that fall
// behind are closed with 1008, the one that keeps up gets every message in
// order, and neither the total nor the heap runs past the bound.
func TestTotalBufferBound(t *testing.T) {
	const bound, size = 2 << 20, 8 << 10
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=1048576", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := r.session(t)
	var slow []*wsClient
	for i := 0; i < 10; i++ {
		slow = append(slow, tp.connectSlow(t, id, token))
	}
	fast := tp.connect(t, id, token)
	before, peakHeap, peakQueued := liveHeap(), int64(0), int64(0)
	closes := func() float64 {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) + tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`)
	}
	for i := 0; closes() < float64(len(slow)); i++ {
		if i == 5000 {
			t.Fatalf("40 MB published and %v of %d slow clients closed", closes(), len(slow))
		}
		message := fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, strings.Repeat("p", size))
		r.publish(t, id, message)
		fast.expectText(message)
		peakQueued = max(peakQueued, tp.p.metrics.queuedBytes.Load())
		if i%100 == 0 {
			peakHeap = max(peakHeap, liveHeap())
		}
	}
	if peakQueued > bound+size+100 {
		t.Errorf("%d bytes queued at most, over the bound of %d plus a message", peakQueued, bound)
	}
	if grown := peakHeap - before; grown > 3*bound {
		t.Errorf("the heap grew by %d MiB with a bound of %d MiB", grown>>20, bound>>20)
	}
	check(t, "closes counted against the total", tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) > 0, true)
	for _, c := range slow {
		c.expectShed()
	}
	if !strings.Contains(tp.logs.String(), `"limit":"total"`) {
		t.Error("no log of a close against the total")
	}
	eventually(t, "queues empty", func() bool { return tp.metric(t, "wsproxy_queued_bytes") == 0 })
}

// However connections end (close frame, dropped socket, after an up
// message, closed for being slow), connections, subscriptions, the hub's
// lists and goroutines return to their baseline, and the Redis pool stays
// bounded.
func TestNothingLeftWhenConnectionsEnd(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=20000")
	eventually(t, "proxy idle", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	httpClient.CloseIdleConnections()
	baseline, baseRedisConns := runtime.NumGoroutine(), fake.Conns()
	var clients []*wsClient
	var ids []string
	for i := 0; i < 10; i++ {
		id, token := r.session(t)
		ids = append(ids, id)
		for j := 0; j < 5; j++ {
			clients = append(clients, tp.connect(t, id, token))
		}
	}
	for _, id := range ids {
		r.publish(t, id, `{"hello":"all"}`)
	}
	for i, c := range clients {
		c.readText()
		switch i % 4 { // leave in every way there is; the last quarter are closed for being slow
		case 0:
			c.sendClose(1000)
		case 1:
			c.conn.Close()
		case 2:
			c.sendText(`{"up":1}`)
			c.conn.Close()
		}
	}
	for _, id := range ids {
		r.publish(t, id, `"`+strings.Repeat("b", 20000)+`"`)
	}
	for i, c := range clients {
		if i%4 == 3 {
			c.conn.Close()
		}
	}
	eventually(t, "no connections", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	eventually(t, "no subscriptions", func() bool { return len(sessionChannels(fake)) == 0 })
	tp.expectMetrics(t, map[string]float64{"wsproxy_subscribed_channels": 0})
	// Goroutines: none left serving a WebSocket, and none at all beyond the
	// two the fake runs for each Redis connection the pool has added.
	httpClient.CloseIdleConnections()
	eventually(t, "no connection goroutines", func() bool { return goroutinesIn("wsproxy.(*conn)", "net/http.(*conn).serve") == 0 })
	eventually(t, "goroutines back to baseline", func() bool {
		return runtime.NumGoroutine() <= baseline+2*(fake.Conns()-baseRedisConns)
	})
	if extra := fake.Conns() - baseRedisConns; extra > 64 {
		t.Errorf("the pool grew by %d connections", extra)
	}
	tp.p.hub.mu.Lock()
	channels, waiting := len(tp.p.hub.channels), len(tp.p.hub.waiting)
	tp.p.hub.mu.Unlock()
	if channels != 0 || waiting != 0 {
		t.Errorf("hub holds %d channels and %d waiting lists", channels, waiting)
	}
}

// The write path: a frame goes to the socket straight from send while
// nothing is queued, and the writer takes over only what the kernel did not
// take. A frame the kernel takes only part of (the client's receive buffer
// is tiny and it does not read) is finished by the writer, and every
// message before and after arrives whole and in publish order, whichever
// path wrote it.
func TestPartialWriteContinuesInOrder(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	client := tp.connectSlow(t, id, token)
	c := tp.connOf(t, id)
	var want []string
	publish := func(m string) { r.publish(t, id, m); want = append(want, m) }
	publish(`{"seq":0}`) // written directly
	client.expectText(want[0])
	for i := 1; ; i++ {
		publish(fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, strings.Repeat("b", 60000))) // more than the socket takes at once
		c.mu.Lock()
		partial, writing := len(c.queue) > 0 && c.queue[0].sent > 0, c.writing
		c.mu.Unlock()
		if partial || writing {
			break // the kernel refused part of a frame: the writer has it
		}
		if i == 200 {
			t.Fatal("12 MB published and the socket never refused a byte")
		}
	}
	for i := 0; i < 20; i++ {
		publish(fmt.Sprintf(`{"seq":"after %d"}`, i)) // queued behind the partial frame
	}
	for _, w := range want[1:] {
		client.expectText(w)
	}
	eventually(t, "the writer done", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return !c.writing })
	publish(`{"seq":"direct again"}`)
	client.expectText(want[len(want)-1])
	eventually(t, "nothing queued", func() bool { return tp.p.metrics.queuedBytes.Load() == 0 })
}

// A write that fails before its system call, because the reader closed the
// socket meanwhile (the client left), reports nothing written: not what the
// write before it took, which cut the next buffer past its end.
func TestWriteOnClosedSocketReportsNothingWritten(t *testing.T) {
	_, conns := benchConns(t, 1)
	c := conns[0]
	if n, err := c.tryWrite(make([]byte, 4096), false); n != 4096 || err != nil {
		t.Fatalf("first write: %d %v", n, err)
	}
	c.netConn.Close()
	n, err := c.tryWrite([]byte("x"), false)
	if n != 0 || err == nil {
		t.Errorf("write on a closed socket: %d %v, want 0 and an error", n, err)
	}
	if err := c.write([]byte("xy")); err == nil { // panicked: slice bounds out of range
		t.Error("the writer's write on a closed socket did not fail")
	}
}

// README: Close codes: a close queued right after a direct write, or behind
// a partial one, goes out after the data, and last.
func TestCloseGoesOutAfterQueuedFrames(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	for _, partial := range []bool{false, true} {
		id, token := r.session(t)
		client := tp.connectSlow(t, id, token)
		c := tp.connOf(t, id)
		// Small frames go out whole; 60 kB ones until the kernel refuses part of one.
		var messages []string
		for queued := false; !queued; {
			if len(messages) == 200 {
				t.Fatal("the socket never refused a byte")
			}
			m := `"` + strings.Repeat("d", map[bool]int{false: 100, true: 60000}[partial]) + `"`
			messages = append(messages, m)
			c.send(outFrame{op: opText, data: []byte(m), received: time.Now().UnixNano()}, false) // as flush does
			c.mu.Lock()
			queued = len(c.queue) > 0
			c.mu.Unlock()
			if !partial {
				if queued {
					t.Fatal("a 100-byte frame was queued, not written")
				}
				break
			}
		}
		c.closeWith(1000, "bye", false)
		for _, m := range messages {
			client.expectText(m)
		}
		if code, reason := client.expectClose(5 * time.Second); code != 1000 || reason != "bye" {
			t.Errorf("partial %v: close %d %q", partial, code, reason)
		}
	}
}

// A client that floods pings and reads nothing holds a queue of pongs: each
// queued frame counts its overhead, so the flood meets MAX_BUFFER_SIZE_BYTES
// and the client is closed with 1008, however empty its pings.
func TestPingFloodIsBounded(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536")
	id, token := r.session(t)
	c := tp.connectSlow(t, id, token)
	c.autoPong = false
	pings := bytes.Repeat(encodeHeader(true, opPing, 0, true), 300000) // pongs past the kernel's buffers
	go c.conn.Write(pings)                                             // blocks once the proxy stops reading: it is closing
	eventually(t, "the flooding client closed for its queue", func() bool {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`) == 1
	})
	c.expectShed()
	eventually(t, "nothing queued", func() bool { return tp.p.metrics.queuedBytes.Load() == 0 })
}

// Pongs queued for clients that flood pings and never read count against
// MAX_TOTAL_BUFFER_BYTES as messages do: the total stays within its bound,
// though no client reaches its own.
func TestPongFloodIsBoundedByTheTotal(t *testing.T) {
	const bound = 1 << 20
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES="+strconv.Itoa(bound), "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := r.session(t)
	pings := bytes.Repeat(append(encodeHeader(true, opPing, 125, true), mask(bytes.Repeat([]byte("p"), 125))...), 5000)
	for range 4 { // each queues about 600 KB of pongs past the kernel's buffers: 2.4 MB together
		c := tp.connectSlow(t, id, token)
		c.autoPong = false
		go c.conn.Write(pings)
	}
	eventually(t, "a flooding client closed for the total", func() bool {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) >= 1
	})
	holdsFor(t, 500*time.Millisecond, func() {
		if q := tp.p.metrics.queuedBytes.Load(); q > bound+4*(125+frameOverhead) { // four readers may each add a pong at once
			t.Fatalf("%d bytes queued, over the bound of %d", q, bound)
		}
	})
	check(t, "closes for one queue", tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`), 0.0)
}

// A client closed for the total while a large frame is half written to it
// is disconnected at once, without a close frame, and what it held is freed:
// shedding makes room, and the total stays within the bound plus a message.
func TestShedClientHalfWayThroughALargeFrameFreesIt(t *testing.T) {
	for _, tc := range []struct{ size, clients int }{{900000, 6}, {120000, 40}} { // 5.4 and 4.8 MB if each kept its frame
		t.Run(strconv.Itoa(tc.size), func(t *testing.T) { shedHalfWay(t, tc.size, tc.clients) })
	}
}

func shedHalfWay(t *testing.T, size, clients int) {
	const bound = 2 << 20
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=1048576", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	large := `"` + strings.Repeat("l", size) + `"`
	var stalled []*wsClient
	for i := range clients {
		id, token := r.session(t)
		stalled = append(stalled, tp.connectSlow(t, id, token))
		c := tp.connOf(t, id)
		for range max(1, 400000/size) { // more than the kernel's buffers take
			r.publish(t, id, large)
			if q := tp.p.metrics.queuedBytes.Load(); q > bound+int64(len(large)+frameOverhead) {
				t.Fatalf("after %d stalled clients: %d bytes queued, over the bound of %d plus a message", i+1, q, bound)
			}
		}
		eventually(t, "the writer waiting for the socket", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.writing || c.closing })
	}
	check(t, "closes for the total", tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) >= 3, true)
	if stalled[0].expectEnd() != nil { // what the kernel took of the frame, then the end
		t.Fatal("a close frame after a frame cut short")
	}
	eventually(t, "nothing queued", func() bool {
		for _, c := range stalled {
			c.conn.Close()
		}
		return tp.p.metrics.queuedBytes.Load() == 0
	})
}

// Clients closed for their own queue while a frame is half-written to them
// hold nothing either: else many of them, each kept with a frame in flight,
// would pass the total, since shedding passes over clients already closing.
func TestClientsClosedForTheirQueueHoldNothing(t *testing.T) {
	const bound = 1 << 20
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	// Past the queue bound, it goes to an empty queue only; 20 of them are
	// 4 MB if each client kept its frame.
	large := `"` + strings.Repeat("c", 200000) + `"`
	for i := range 20 {
		id, token := r.session(t)
		client := tp.connectSlow(t, id, token)
		c := tp.connOf(t, id)
		r.publish(t, id, large)
		eventually(t, "the writer waiting for the socket", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.writing })
		client.writeFrame(true, opPing, nil) // its pong passes the queue bound
		eventually(t, "closed for its queue", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.closing })
		if q := tp.p.metrics.queuedBytes.Load(); q > bound+int64(len(large)+frameOverhead) {
			t.Fatalf("after %d clients closed for their queue: %d bytes queued, over the bound of %d plus a message", i+1, q, bound)
		}
	}
}

// One message larger than MAX_BUFFER_SIZE_BYTES is still delivered to a
// client whose queue is empty: it is a worker's message, not a client that
// is behind.
func TestMessageLargerThanTheQueueBoundIsDelivered(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536")
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	large := `"` + strings.Repeat("l", 200000) + `"`
	r.publish(t, id, large)
	c.expectText(large)
	r.publish(t, id, `"after"`)
	c.expectText(`"after"`)
	check(t, "slow-client closes", tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`), 0.0)
}

// A queue that grew long while its client was behind gives its array back
// once drained: an idle connection does not keep what it needed then.
func TestDrainedQueueGivesBackItsArray(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	client := tp.connectSlow(t, id, token)
	c := tp.connOf(t, id)
	rc, err := redis.DialURL(r.url)
	must(t, err)
	defer rc.Close()
	message := `"` + strings.Repeat("q", 100) + `"`
	for range 20000 { // 2 MB, far more than the sockets take
		rc.Send("PUBLISH", "session:"+id+":down", message)
	}
	_, err = rc.Do("")
	must(t, err)
	queueCap := func() int { c.mu.Lock(); defer c.mu.Unlock(); return cap(c.queue) }
	eventually(t, "a long queue", func() bool { return queueCap() > 1000 })
	for range 20000 {
		client.expectText(message)
	}
	eventually(t, "the queue drained", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return !c.writing && len(c.queue) == 0 })
	if n := queueCap(); n > queueKeep {
		t.Errorf("the drained queue keeps an array of %d frames", n)
	}
}

// A frame, or one byte of it, sent in the same write as the handshake,
// which net/http reads into its own 4 KiB buffer, does not leave the idle
// connection holding that buffer (README: Performance, memory per idle
// connection).
func TestFrameWithTheHandshakeLeavesASmallReadBuffer(t *testing.T) {
	tp := startProxy(t, newTestRedis(t), "AUTH_MODE=none")
	const n = 300
	heapPerConnection := func(glued bool) int64 {
		published := tp.p.metrics.messagesUp.Load()
		before := liveHeap()
		var conns []net.Conn
		for i := range n {
			nc, err := net.Dial("tcp", tp.addr)
			must(t, err)
			conns = append(conns, nc)
			request := fmt.Sprintf("GET /agent/ws/heap-%v-%d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", glued, i)
			frame := append(encodeHeader(true, opText, 7, true), mask([]byte(`{"a":1}`))...)
			if glued {
				request += string(frame[:1]) // one byte of it: net/http has read it with the request
			}
			nc.Write([]byte(request))
			var answer []byte
			for buf := make([]byte, 256); !bytes.Contains(answer, []byte("\r\n\r\n")); {
				nc.SetReadDeadline(time.Now().Add(processWait))
				k, err := nc.Read(buf)
				must(t, err)
				answer = append(answer, buf[:k]...)
			}
			if glued {
				frame = frame[1:]
			}
			nc.Write(append(frame, 0x89)) // and the first byte of a ping: the read buffer is never empty

		}
		eventually(t, "every message published", func() bool { return tp.p.metrics.messagesUp.Load()-published == n })
		eventually(t, "every reader waiting", func() bool { return goroutinesIn("wsproxy.readFrameHeader") >= n })
		grown := (liveHeap() - before) / n
		for _, nc := range conns {
			nc.Close()
		}
		eventually(t, "the connections gone", func() bool { return tp.p.metrics.active.Load() == 0 })
		return grown
	}
	heapPerConnection(false) // the Redis pool grows once for the publishes
	plain, glued := heapPerConnection(false), heapPerConnection(true)
	if glued-plain > 1<<10 {
		t.Errorf("an idle connection holds %d bytes of heap after a frame sent with its handshake, %d without", glued, plain)
	}
}

// A client that reads slowly but steadily is served, however long its queue
// takes to drain: the writer gives up only when the socket takes nothing
// for writeWait (here 300 ms), not when one write takes longer than that.
func TestSlowSteadyReaderIsServed(t *testing.T) {
	saved := writeWait
	t.Cleanup(func() { writeWait = saved }) // after the proxy's own cleanup has stopped it
	writeWait = 300 * time.Millisecond
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	message := func(i int) string { return fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, strings.Repeat("s", 60000)) }
	read := make(chan error, 1)
	go func() { // about 3 MB/s
		for i := range 100 {
			f, err := c.next(10 * time.Second)
			if err != nil || string(f.payload) != message(i) {
				read <- fmt.Errorf("message %d: %v %.30q", i, err, f.payload)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		read <- nil
	}()
	rc, err := redis.DialURL(r.url)
	must(t, err)
	defer rc.Close()
	for i := range 100 { // 6 MB at once, far more than the socket's buffers
		rc.Send("PUBLISH", "session:"+id+":down", message(i))
	}
	_, err = rc.Do("")
	must(t, err)
	check(t, "every message read", <-read, nil)
}

// Past MAX_TOTAL_BUFFER_BYTES the clients that have been behind the longest
// are closed first: a client that gets a burst larger than its socket takes
// is not closed while clients stalled for longer hold the budget.
func TestTotalBoundClosesTheLongestBehindFirst(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=4194304", "MAX_TOTAL_BUFFER_BYTES=4194304")
	pad := strings.Repeat("p", 60000)
	var stalled []*wsClient
	for _, budget := range []int64{3 << 19, 3 << 20} { // two stalled clients, one after the other, hold most of the budget
		id, token := r.session(t)
		stalled = append(stalled, tp.connectSlow(t, id, token))
		for tp.p.metrics.queuedBytes.Load() < budget {
			r.publish(t, id, `"`+pad+`"`)
		}
	}
	fastID, fastToken := r.session(t)
	fast := tp.connect(t, fastID, fastToken)
	rc, err := redis.DialURL(r.url)
	must(t, err)
	defer rc.Close()
	for i := range 40 { // 2.4 MB at once, more than its socket takes: it is behind too, but for less long
		rc.Send("PUBLISH", "session:"+fastID+":down", fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, pad))
	}
	_, err = rc.Do("")
	must(t, err)
	// It reads only once the total was passed: reading sooner could drain it
	// below the bound before the proxy has dispatched the whole burst.
	eventually(t, "a close for the total", func() bool {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) >= 1
	})
	for i := range 40 {
		if got := fast.readText(); !strings.HasPrefix(got, fmt.Sprintf(`{"seq":%d,`, i)) {
			t.Fatalf("fast client: message %d is %.20q", i, got)
		}
	}
	// The one behind the longest was closed, which made room enough.
	stalled[0].expectShed()
	check(t, "closes for the total", tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`), 1.0)
}

// What a stalled client holds is its queue and at most one 64 KiB write
// buffer: large messages are not copied whole for the socket.
func TestLargeMessagesAreNotCopiedForStalledClients(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=4194304")
	before := liveHeap()
	const clients, size = 10, 1 << 20
	for i := range clients {
		id, token := r.session(t)
		tp.connectSlow(t, id, token)
		r.publish(t, id, fmt.Sprintf(`"%d%s"`, i, strings.Repeat("L", size)))
	}
	eventually(t, "every message queued", func() bool { return tp.p.metrics.queuedBytes.Load() >= clients*size })
	if grown := liveHeap() - before; grown > clients*size*3/2 {
		t.Errorf("%d MB queued grew the heap by %d MB", clients*size>>20, grown>>20)
	}
}

// A client that trickles a frame's payload is alive: each read that brings
// bytes counts, not only a whole frame (README: Liveness).
func TestTricklingClientIsAlive(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "WS_PING_INTERVAL_SECS=0.3", "WS_PING_TIMEOUT_SECS=0.3")
	id, token := r.session(t)
	up := r.up(t, id)
	c := tp.connect(t, id, token)
	message := mask([]byte(`{"trickled":"` + strings.Repeat("t", 8) + `"}`))
	c.conn.Write(encodeHeader(true, opText, uint64(len(message)), true))
	for _, b := range message { // one byte every 150 ms: 3 s, five times the liveness window
		time.Sleep(150 * time.Millisecond)
		_, err := c.conn.Write([]byte{b})
		must(t, err)
	}
	expectMessage(t, up, `{"trickled":"tttttttt"}`)
}

// Request headers are bounded: 32 KiB is plenty for a handshake's.
func TestLargeRequestHeadersRefused(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	h := bearer(token)
	h.Set("X-Padding", strings.Repeat("h", 64<<10))
	_, res := tp.dial(t, "/agent/ws/"+id, h)
	check(t, "status", res.status, http.StatusRequestHeaderFieldsTooLarge)
}

// The upgrade is checked as x/net/websocket checks it, before any token is
// spent; a browser that offers subprotocols gets the first one back (it
// fails the connection without one).
func TestUpgradeCheckedBeforeAuthAndSubprotocolEchoed(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=0")
	id, token := r.session(t)
	h := bearer(token)
	h.Set("Upgrade", "websocket, foo")
	tp.expectRefused(t, "/agent/ws/"+id, h, 400, "bad_request")
	check(t, "single-use token still there", r.do(t, "GET", "session:"+id+":auth") != nil, true)
	h = bearer(token)
	h.Set("Sec-WebSocket-Protocol", "chat, superchat")
	c, res := tp.dial(t, "/agent/ws/"+id, h)
	if c == nil {
		t.Fatalf("two subprotocols offered: %d %s", res.status, res.body)
	}
	check(t, "subprotocol", res.header.Get("Sec-WebSocket-Protocol"), "chat")
}

// A refusal completed for a browser holds its slot until it is closed, so
// refusals cannot hold more sockets than MAX_CONNECTIONS allows.
func TestBrowserRefusalHoldsItsSlot(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_CONNECTIONS=1")
	id, token := r.session(t)
	refused, res := tp.dial(t, "/agent/ws/"+id+"?token=wrong", http.Header{"Origin": {"http://localhost"}})
	if refused == nil {
		t.Fatalf("want 101 then a close: %d %s", res.status, res.body)
	}
	f, err := refused.readFrame(5 * time.Second) // its close frame, left unanswered
	check(t, "close frame", err == nil && f.op == opClose && closeCode(f.payload) == 4403, true)
	tp.expectRefused(t, "/agent/ws/"+id, bearer(token), 503, "too_many_connections")
	refused.conn.Close()
	eventually(t, "the slot released", func() bool { return tp.p.slots.Load() == 0 })
	tp.connect(t, id, token)
}

// A connection that outlives AUTH_GRACE_PERIOD_SECS keeps its token alive,
// so that it can still reconnect within the grace period after it leaves.
func TestLongConnectionKeepsItsToken(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=1")
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	holdsFor(t, 2500*time.Millisecond, func() {
		check(t, "the key exists", r.do(t, "GET", "session:"+id+":auth") != nil, true)
	})
	c.sendClose(1000)
	c.expectClose(5 * time.Second)
	tp.connect(t, id, token)
}

// ---------------------------------------------------------------------------
// README: Redis outages and shutdown (Redis outages)

// redisSilence is how long the subscriber may hear nothing before it is
// declared dead (README: Redis outages and shutdown).
const redisSilence = 5 * time.Second

// With no client, the subscriber is PINGed and stays up. A subscriber
// connection that stops answering without being closed (half-open) is
// noticed within a few seconds, and the proxy says so for as long as Redis
// answers nothing, even though it still accepts TCP connections.
func TestSubscriberPingedAndHalfOpenNoticed(t *testing.T) {
	t.Parallel() // it waits 14 s: beside the other tests that wait
	r, fake := newFake(t)
	tp := startProxy(t, r)
	eventually(t, "two health-check PINGs", func() bool { return fake.CommandCount("PING") >= 2 })
	tp.expectMetrics(t, map[string]float64{"wsproxy_redis_reconnects_total": 0, "wsproxy_redis_connected": 1})
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	fake.Freeze(true)
	frozen := time.Now()
	eventually(t, "wsproxy_redis_connected 0", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	if took := time.Since(frozen); took > redisSilence+3*time.Second {
		t.Errorf("half-open subscriber noticed after %v, want within a few seconds", took)
	}
	// A hung or SIGSTOPped Redis accepts connections and answers nothing: a
	// new subscriber connection is no proof that Redis is back.
	holdsFor(t, redisSilence+time.Second, func() {
		if got := tp.metric(t, "wsproxy_redis_connected"); got != 0 {
			t.Fatalf("wsproxy_redis_connected %v while Redis answers nothing", got)
		}
		if status, body := tp.getWithin(t, "/ready", 2*time.Second); status != 503 || !strings.Contains(body, "redis_unavailable") {
			t.Fatalf("/ready while Redis answers nothing: %d %s", status, body)
		}
		if status, body := tp.getWithin(t, "/health", 2*time.Second); status != 503 {
			t.Fatalf("/health while Redis answers nothing: %d %s", status, body)
		}
	})
	fake.Freeze(false)
	eventually(t, "ready again", func() bool { status, _ := tp.getWithin(t, "/ready", 5*time.Second); return status == 200 })
	c.expectControlError("redis_reconnected")
}

// The subscriber is dropped and Redis refuses connections for a while.
// WebSockets stay open and the proxy reports the outage everywhere; after
// recovery every channel that still has connections, and only those, is
// subscribed again, and each open connection is told redis_reconnected
// before anything published afterwards.
func TestRedisOutageKeepsConnectionsOpenAndResubscribes(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	a, tokenA := r.session(t)
	b, tokenB := r.session(t)
	gone, tokenGone := r.session(t)
	a1, a2 := tp.connect(t, a, tokenA), tp.connect(t, a, tokenA)
	b1 := tp.connect(t, b, tokenB)
	leaver := tp.connect(t, gone, tokenGone)
	r.publish(t, a, `"before"`)
	a1.readText()
	a2.readText()

	fake.RefuseConnections(true)
	fake.DropConnections()
	eventually(t, "wsproxy_redis_connected 0", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	tp.expectGet(t, "/health", 503, `"redis":"disconnected"`)
	tp.expectGet(t, "/ready", 503, `"status":"redis_unavailable"`)
	tp.expectRefused(t, "/agent-1/ws/"+a, bearer(tokenA), 503, "redis_unavailable")
	a1.sendText(`{"lost":"in the outage"}`)
	a1.expectControlError("publish_failed")
	check(t, "receivers during the outage", fake.Publish("session:"+a+":down", []byte(`"lost"`)), 0)
	leaver.sendClose(1000) // its channel must not come back
	leaver.expectClose(5 * time.Second)
	eventually(t, "3 connections left", func() bool { return tp.metric(t, "wsproxy_active_connections") == 3 })

	fake.RefuseConnections(false)
	eventually(t, "wsproxy_redis_connected 1", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 1 })
	want := []string{"session:" + a + ":down", "session:" + b + ":down"}
	slices.Sort(want)
	eventually(t, fmt.Sprint("resubscribed to ", want), func() bool { return slices.Equal(sessionChannels(fake), want) })
	for i := 0; i < 3; i++ {
		r.publish(t, a, fmt.Sprintf(`{"seq":%d}`, i))
		r.publish(t, b, fmt.Sprintf(`{"seq":%d}`, i))
	}
	check(t, "reconnects counted", tp.metric(t, "wsproxy_redis_reconnects_total") >= 1, true)
	tp.expectMetrics(t, map[string]float64{"wsproxy_subscribed_channels": 2, "wsproxy_active_connections": 3})
	tp.expectGet(t, "/ready", 200, "ready")
	for _, c := range []*wsClient{a1, a2, b1} {
		c.expectControlError("redis_reconnected")
		for i := 0; i < 3; i++ {
			c.expectText(fmt.Sprintf(`{"seq":%d}`, i))
		}
	}
	tp.expectMetrics(t, map[string]float64{`wsproxy_client_errors_total{code="redis_reconnected"}`: 3})
	up := r.up(t, a)
	a1.sendText(`{"after":"recovery"}`)
	expectMessage(t, up, `{"after":"recovery"}`)
	r.publish(t, a, `"after"`)
	a1.expectText(`"after"`)
}

// The service starts while Redis is down, says so, and becomes ready when
// Redis comes up; run as a process, since starting is the point.
func TestServiceStartsWhileRedisDownAndBecomesReady(t *testing.T) {
	r, fake := newFake(t)
	id, token := r.session(t)
	fake.RefuseConnections(true)
	p := startBinary(t, r.url)
	eventually(t, "listening", func() bool { status, _, _ := httpGet(p.addr, "/ready", 5*time.Second); return status != 0 })
	// Redis accepts TCP connections and closes them at once, as a Redis at
	// maxclients or a TCP proxy with no Redis behind it does: not ready.
	holdsFor(t, 3*time.Second, func() {
		if status, body := p.getWithin(t, "/ready", 2*time.Second); status != 503 || !strings.Contains(body, "redis_unavailable") {
			t.Fatalf("/ready with Redis down: %d %s", status, body)
		}
	})
	if status, body := p.getWithin(t, "/health", 2*time.Second); status != 503 {
		t.Errorf("/health with Redis down: %d %s", status, body)
	}
	// Not counted as a reconnect: the subscriber was never declared connected before Redis answered.
	p.expectMetrics(t, map[string]float64{"wsproxy_redis_reconnects_total": 0})
	p.expectRefused(t, "/agent/ws/"+id, bearer(token), 503, "redis_unavailable")
	check(t, "exited with Redis down", p.hasExited(), false)
	fake.RefuseConnections(false)
	p.waitReady(t)
	if status, body := p.getWithin(t, "/health", 2*time.Second); status != 200 {
		t.Errorf("/health once Redis is up: %d %s", status, body)
	}
	c := p.connect(t, id, token)
	r.publish(t, id, `"hello"`)
	c.expectText(`"hello"`)
	p.expectMetrics(t, map[string]float64{"wsproxy_redis_reconnects_total": 0}) // the first connection is no reconnect
}

// A handshake waiting for its SUBSCRIBE confirmation when the subscriber
// connection breaks is answered 503 at once, not after
// SUBSCRIBE_TIMEOUT_SECS, and leaves no connection, waiter or subscription.
func TestHandshakeWaitingForSubscriptionFailsWhenRedisBreaks(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r, "SUBSCRIBE_TIMEOUT_SECS=10")
	id, token := r.session(t)
	fake.HoldSubscribes(true)
	answered := tp.dialAsync("/agent/ws/"+id, bearer(token))
	fake.WaitSubscribers(t, "session:"+id+":down", 1) // its SUBSCRIBE is in; the confirmation is held
	fake.DropConnections()
	broke := time.Now()
	select {
	case d := <-answered:
		if took := time.Since(broke); d.res.status != 503 || d.res.code != "redis_unavailable" || took > 5*time.Second {
			t.Errorf("handshake: %d %s %v after %v, want 503 redis_unavailable well before SUBSCRIBE_TIMEOUT_SECS", d.res.status, d.res.body, d.err, took)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the handshake was not answered")
	}
	fake.HoldSubscribes(false)
	eventually(t, "subscriber back", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 1 })
	eventually(t, "hub empty", func() bool {
		tp.p.hub.mu.Lock()
		defer tp.p.hub.mu.Unlock()
		return len(tp.p.hub.channels) == 0 && len(tp.p.hub.waiting) == 0
	})
	check(t, "subscribed after recovery", len(sessionChannels(fake)), 0)
	tp.expectMetrics(t, map[string]float64{"wsproxy_subscribed_channels": 0, "wsproxy_active_connections": 0})
}

// After a short outage, once /ready says Redis is back, the very next
// handshake and upstream message succeed, rather than failing on pooled
// connections that died with the old ones.
func TestFirstRequestsAfterRecoverySucceed(t *testing.T) {
	r, fake := newFake(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token) // its GET and EXPIRE leave a pooled connection, just used
	blip := func() {
		t.Helper()
		reconnects := tp.metric(t, "wsproxy_redis_reconnects_total")
		fake.DropConnections()
		eventually(t, "subscriber reconnected", func() bool {
			return tp.metric(t, "wsproxy_redis_reconnects_total") > reconnects && tp.metric(t, "wsproxy_redis_connected") == 1
		})
		tp.expectGet(t, "/ready", 200, "ready")
		c.expectControlError("redis_reconnected")
	}
	blip()
	if d, res := tp.dial(t, "/agent-1/ws/"+id, bearer(token)); d == nil {
		t.Errorf("first handshake after recovery: %d %s, want 101", res.status, res.body)
	}
	tp.connect(t, id, token) // leaves a pooled connection, just used
	blip()
	published := fake.CommandCount("PUBLISH")
	c.sendText(`{"first":"after recovery"}`)
	for deadline := time.Now().Add(5 * time.Second); fake.CommandCount("PUBLISH") == published; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			f, err := c.next(time.Second)
			t.Fatalf("the first upstream message after recovery was not published; the client got %s %v", f.payload, err)
		}
	}
}

// A real redis-server killed and restarted empty: open connections stay,
// are resubscribed and told redis_reconnected; meanwhile handshakes, /ready
// and upstream messages fail as during any outage.
func TestRealRedisRestartKeepsConnectionsOpen(t *testing.T) {
	server := startRedisServer(t)
	r := &testRedis{url: server.url()}
	tp := startProxy(t, r)
	a, tokenA := r.session(t)
	b, tokenB := r.session(t)
	clients := []*wsClient{tp.connect(t, a, tokenA), tp.connect(t, a, tokenA), tp.connect(t, b, tokenB)}
	check(t, "receivers", r.publish(t, a, `"before"`), 1) // the proxy
	clients[0].readText()
	clients[1].readText()
	server.kill()
	eventually(t, "wsproxy_redis_connected 0", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	tp.expectRefused(t, "/agent-1/ws/"+a, bearer(tokenA), 503, "redis_unavailable")
	tp.expectGet(t, "/ready", 503, "redis_unavailable")
	clients[2].sendText(`{"lost":true}`)
	clients[2].expectControlError("publish_failed")
	server.start() // empty: the tokens are gone, the open connections are not
	eventually(t, "wsproxy_redis_connected 1", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 1 })
	r.waitNumSub(t, "session:"+a+":down", 1)
	r.waitNumSub(t, "session:"+b+":down", 1)
	r.publish(t, a, `"after a"`)
	r.publish(t, b, `"after b"`)
	for i, want := range []string{`"after a"`, `"after a"`, `"after b"`} {
		clients[i].expectControlError("redis_reconnected")
		clients[i].expectText(want)
	}
	check(t, "reconnects counted", tp.metric(t, "wsproxy_redis_reconnects_total") >= 1, true)
	id, token := r.session(t)
	tp.connect(t, id, token) // new handshakes work again
}

// ---------------------------------------------------------------------------
// README: Redis outages and shutdown (Shutdown), the binary signalled

// After SIGTERM the proxy answers /ready 503 at once, logs its progress,
// refuses new connections but serves the open ones, and exits with status 0
// as soon as the last one closes, long before the deadline.
func TestShutdownDrainsUntilLastConnectionCloses(t *testing.T) {
	r, _ := newFake(t)
	p := startBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=20")
	p.waitReady(t)
	id, token := r.session(t)
	first, second := p.connect(t, id, token), p.connect(t, id, token)
	eventually(t, "2 active connections", func() bool { return p.metric(t, "wsproxy_active_connections") == 2 })
	signalled := p.signal(t, syscall.SIGTERM)
	eventually(t, "/ready draining", func() bool {
		status, body, _ := httpGet(p.addr, "/ready", 5*time.Second)
		return status == 503 && strings.Contains(body, `"status":"draining"`)
	})
	if took := time.Since(signalled); took > time.Second {
		t.Errorf("/ready said draining %v after SIGTERM, want at once", took)
	}
	draining := p.waitLog(t, `the "draining" record`, func(rec map[string]any) bool { return rec["msg"] == "draining" })
	if draining["connections"] != 2.0 {
		t.Errorf("draining log: connections %v, want 2", draining["connections"])
	}
	if deadline, err := time.Parse(time.RFC3339Nano, fmt.Sprint(draining["deadline"])); err != nil ||
		deadline.Sub(signalled.Add(20*time.Second)).Abs() > 2*time.Second {
		t.Errorf("draining log: deadline %v, want about 20 s after the signal", draining["deadline"])
	}
	p.expectRefused(t, "/agent/ws/"+id, bearer(token), 503, "draining")
	r.publish(t, id, `"during the grace period"`)
	first.expectText(`"during the grace period"`)
	second.expectText(`"during the grace period"`)
	first.sendClose(1000)
	first.expectCloseCode(1000)
	first.conn.Close()
	r.publish(t, id, `"still serving"`) // one connection left: not exited yet
	second.expectText(`"still serving"`)
	closed := time.Now()
	second.sendClose(1000)
	second.expectCloseCode(1000)
	second.conn.Close()
	check(t, "exit", p.waitExit(5*time.Second), nil)
	if took := time.Since(closed); took > 3*time.Second {
		t.Errorf("exited %v after the last connection closed, want at once", took)
	}
}

// At the deadline every remaining connection first receives what is queued
// for it, then close 1001. A client that has read nothing has megabytes
// queued in the proxy by then, more than the socket buffers hold.
func TestShutdownDeadlineFlushesQueuesThenCloses1001(t *testing.T) {
	r, fake := newFake(t)
	p := startBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=1", "MAX_BUFFER_SIZE_BYTES=67108864")
	p.waitReady(t)
	id, token := r.session(t)
	stalled, reader := p.connect(t, id, token), p.connect(t, id, token)
	const count = 160 // of 64 KiB: 10 MiB
	message := func(i int) string { return fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, strings.Repeat("q", 64<<10)) }
	for i := 0; i < count; i++ {
		fake.Publish("session:"+id+":down", []byte(message(i)))
	}
	// Once the reader has everything, the proxy has queued it all for the
	// stalled client as well: the hub queues each message for both at once.
	for i := 0; i < count; i++ {
		reader.expectText(message(i))
	}
	signalled := p.signal(t, syscall.SIGTERM)
	p.waitLog(t, "grace period over", func(rec map[string]any) bool { return strings.HasPrefix(fmt.Sprint(rec["msg"]), "grace period over") })
	if took := time.Since(signalled); took < time.Second-100*time.Millisecond {
		t.Errorf("connections closed %v after SIGTERM, before the 1 s grace period", took)
	}
	stalled.wait = 10 * time.Second
	for i := 0; i < count; i++ {
		stalled.expectText(message(i)) // the queue is flushed before the close
	}
	for name, c := range map[string]*wsClient{"stalled": stalled, "reader": reader} {
		if code, reason := c.expectClose(5 * time.Second); code != 1001 {
			t.Errorf("%s client: close %d %q, want 1001", name, code, reason)
		}
		c.conn.Close()
	}
	check(t, "exit", p.waitExit(10*time.Second), nil)
}

// A second signal skips the wait: every connection is closed with 1001 at
// once, and the exit status is still 0.
func TestShutdownSecondSignalClosesAtOnce(t *testing.T) {
	r, _ := newFake(t)
	p := startBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=30")
	p.waitReady(t)
	id, token := r.session(t)
	clients := []*wsClient{p.connect(t, id, token), p.connect(t, id, token), p.connect(t, id, token)}
	p.signal(t, syscall.SIGTERM)
	p.waitLog(t, `the "draining" record`, func(rec map[string]any) bool { return rec["msg"] == "draining" })
	second := p.signal(t, syscall.SIGINT)
	for i, c := range clients {
		if code, reason := c.expectClose(5 * time.Second); code != 1001 {
			t.Errorf("client %d: close %d %q, want 1001", i, code, reason)
		}
		c.conn.Close()
	}
	if took := time.Since(second); took > 2*time.Second {
		t.Errorf("closed %v after the second signal, want at once", took)
	}
	check(t, "exit", p.waitExit(5*time.Second), nil)
	p.waitLog(t, "the second signal's record", func(rec map[string]any) bool { return strings.HasPrefix(fmt.Sprint(rec["msg"]), "second signal") })
}

// ---------------------------------------------------------------------------
// README: Several instances behind a load balancer

// Two processes on one Redis: both connections of a session receive every
// message; when one instance stops, its client is closed with 1001 and
// reconnects to the other with the same token.
func TestTwoInstancesShareOneRedis(t *testing.T) {
	r := &testRedis{}
	if _, err := exec.LookPath("redis-server"); err == nil {
		r.url = startRedisServer(t).url()
	} else {
		t.Log("redis-server is not installed: the instances share the fake Redis")
		r, _ = newFake(t)
	}
	env := []string{"AUTH_GRACE_PERIOD_SECS=60", "SHUTDOWN_GRACE_PERIOD_SECS=1"}
	stopping, staying := startBinary(t, r.url, env...), startBinary(t, r.url, env...)
	stopping.waitReady(t)
	staying.waitReady(t)
	id, token := r.session(t)
	moving, fixed := stopping.connect(t, id, token), staying.connect(t, id, token)
	check(t, "receivers", r.publish(t, id, `{"seq":0}`), 2) // one per instance
	for i := 1; i < 20; i++ {
		r.publish(t, id, fmt.Sprintf(`{"seq":%d}`, i))
	}
	for _, c := range []*wsClient{moving, fixed} {
		for i := 0; i < 20; i++ {
			c.expectText(fmt.Sprintf(`{"seq":%d}`, i))
		}
	}
	stopping.signal(t, syscall.SIGTERM)
	moving.expectCloseCode(1001)
	moving.conn.Close()
	check(t, "the stopped instance's exit", stopping.waitExit(5*time.Second), nil)
	moved := staying.connect(t, id, token)
	check(t, "receivers", r.publish(t, id, `"after the move"`), 1) // the remaining instance
	moved.expectText(`"after the move"`)
	fixed.expectText(`"after the move"`)
}

// ---------------------------------------------------------------------------
// README: Container

// The CGO_ENABLED=0 binary is static and runs alone in an empty root: no
// /etc, no CA bundle, no libc.
func TestStaticBinaryRunsInEmptyRoot(t *testing.T) {
	bin := program(t, "wsproxy")
	f, err := elf.Open(bin)
	must(t, err)
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Errorf("the binary has a PT_INTERP program header: it needs a dynamic loader")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary needs shared libraries %v", libs)
	}
	if os.Geteuid() != 0 {
		t.Skip("running the binary under chroot needs root")
	}
	chroot, err := exec.LookPath("chroot")
	if err != nil {
		t.Skip("chroot is not installed")
	}
	root := t.TempDir()
	data, err := os.ReadFile(bin)
	if err == nil {
		err = os.WriteFile(filepath.Join(root, "wsproxy"), data, 0o755)
	}
	must(t, err)
	r, _ := newFake(t)
	p := startProxyProcess(t, []string{chroot, root, "/wsproxy"}, "REDIS_URL="+r.url)
	p.waitReady(t)
	if status, body := p.getWithin(t, "/health", 2*time.Second); status != 200 {
		t.Errorf("/health of the chrooted binary: %d %s", status, body)
	}
	entries, _ := os.ReadDir(root)
	check(t, "entries in the root", len(entries), 1) // the binary alone
}

// ---------------------------------------------------------------------------
// The examples (examples/README.md): the browser page in a real headless
// Chromium, the FastAPI worker, the Go client, and the walkthroughs'
// machinery. They run real processes and skip with a message naming what
// is missing.

// examplesProxy runs the built proxy for an example on port (0: a free one)
// against r, and waits until it is ready.
func examplesProxy(t *testing.T, r *testRedis, port int, env ...string) *proxyProcess {
	t.Helper()
	if port != 0 {
		env = append(env, "PORT="+strconv.Itoa(port))
	}
	p := startBinary(t, r.url, env...)
	p.waitReady(t)
	return p
}

// The browser page: a published message appears byte for byte and its
// payload in the answer area; what the user sends arrives on the up
// channel; a message that is not JSON shows the proxy's control error; when
// the proxy restarts the page shows 1001 and reconnects by itself.
func TestBrowserClient(t *testing.T) {
	r := realRedis(t)
	port := freePort(t)
	proxy := examplesProxy(t, r, port, "SHUTDOWN_GRACE_PERIOD_SECS=0.2")
	sessionID, token := r.session(t)
	up := r.up(t, sessionID)
	page := openPage(t, url.Values{"url": {fmt.Sprintf("ws://127.0.0.1:%d", port)}, "agent": {"browser-agent"},
		"session": {sessionID}, "token": {token}, "autoconnect": {"1"}})
	page.waitFor("the connection to open", `document.getElementById("status").dataset.state === "open"`)

	down := `{"type":"data","payload":"hello from Redis"}`
	check(t, "receivers", r.publish(t, sessionID, down), 1) // the proxy
	page.waitFor("the published message in #log", `[...document.querySelectorAll("#log .msg .body")].some(e => e.textContent === `+jsString(down)+`)`)
	check(t, "#stream", page.eval(`document.getElementById("stream").textContent`), "hello from Redis")
	outgoing := `{"type":"chat","text":"hi from the browser"}`
	page.send(outgoing)
	expectMessage(t, up, outgoing)
	page.send("not json")
	page.waitFor("the invalid_json control error", `[...document.querySelectorAll("#log .control-error .body")].some(e => e.textContent.startsWith("invalid_json"))`)

	proxy.signal(t, syscall.SIGTERM)
	check(t, "the proxy's exit on SIGTERM", proxy.waitExit(processWait), nil)
	page.waitFor("close code 1001", `document.getElementById("close-code").dataset.code === "1001"`)
	page.waitFor("the page to schedule a reconnection", `document.getElementById("status").dataset.state === "reconnecting"`)
	examplesProxy(t, r, port, "SHUTDOWN_GRACE_PERIOD_SECS=0.2")
	page.waitFor("the page to reconnect", `document.getElementById("status").dataset.state === "open"`)
	again := `{"type":"data","payload":" and hello again"}`
	check(t, "receivers after the reconnection", r.publish(t, sessionID, again), 1)
	page.waitFor("the message published after the reconnection", `[...document.querySelectorAll("#log .msg .body")].some(e => e.textContent === `+jsString(again)+`)`)
}

// The page says in words why the proxy refused it, and acts on the close
// code. Refused for good (4401, 4403), it stops: the proxy sees that one
// handshake and no more. Refused for now (4503 with MAX_CONNECTIONS=1 and
// the one connection taken), it backs off and retries, keeps what the user
// sent, and connects, sending it once, when there is room.
func TestBrowserClientRefusals(t *testing.T) {
	r := realRedis(t)
	proxy := examplesProxy(t, r, 0, "MAX_CONNECTIONS=1")
	sessionID, token := r.session(t)
	up := r.up(t, sessionID)
	page := openPage(t, url.Values{"url": {"ws://" + proxy.addr}, "agent": {"browser-agent"}})
	connect := func(session, token string) {
		page.eval(`document.getElementById("session").value = ` + jsString(session) + `; document.getElementById("token").value = ` +
			jsString(token) + `; document.getElementById("connect").click(); true`)
	}
	status := func() (state, retrying, text string) {
		value, _ := page.eval(`JSON.stringify([document.getElementById("status").dataset.state,
			document.getElementById("status").dataset.retrying, document.getElementById("status").textContent])`).(string)
		var fields []string
		if json.Unmarshal([]byte(value), &fields); len(fields) != 3 {
			t.Fatalf("#status reads %q", value)
		}
		return fields[0], fields[1], fields[2]
	}
	for i, tc := range []struct{ name, session, token, close, result, words string }{
		{"unknown session", randomID(), token, "4401 unknown_session", "unauthorized", "refused: unknown_session (4401) - get a new token"},
		{"wrong token", sessionID, "wrong-token", "4403 invalid_token", "forbidden", "refused: invalid_token (4403) - get a new token"},
	} {
		connect(tc.session, tc.token)
		page.waitFor(tc.name+" refused", `document.getElementById("status").dataset.state === "refused"`)
		check(t, tc.name+": #close-code", page.eval(`document.getElementById("close-code").dataset.code + " " + document.getElementById("close-code").dataset.reason`), tc.close)
		if _, retrying, text := status(); text != tc.words || retrying != "false" {
			t.Errorf("%s: #status %q, data-retrying=%s; want %q, not retrying", tc.name, text, retrying, tc.words)
		}
		page.waitFor(tc.name+" in #log", `[...document.querySelectorAll("#log .close .body")].some(e => e.textContent === `+jsString(tc.words)+`)`)
		holdsFor(t, 2*time.Second, func() { // the backoff would have retried within 0.6 s
			if n := proxy.metric(t, handshakes(tc.result)); n != 1 {
				t.Fatalf("%s: %s handshakes %v, want 1: the page retried a refusal for good; page: %s", tc.name, tc.result, n, page.state())
			}
		})
		if state, retrying, _ := status(); state != "refused" || retrying != "false" {
			t.Fatalf("%s: after 2 s the page is %s (retrying %s), want still refused; page: %s", tc.name, state, retrying, page.state())
		}
		check(t, tc.name+": refusals logged in all", strings.Count(proxy.logs.String(), `"msg":"handshake refused"`), i+1)
	}

	holder := proxy.connect(t, sessionID, token) // the one connection MAX_CONNECTIONS allows
	page.eval(`document.getElementById("session").value = ` + jsString(sessionID) + `; document.getElementById("token").value = ` + jsString(token) + `; true`)
	kept := `{"type":"chat","text":"sent while the proxy was full"}`
	page.send(kept) // which connects
	page.waitFor("the page backing off after 4503",
		`document.getElementById("close-code").dataset.code === "4503" && document.getElementById("status").dataset.state === "reconnecting"`)
	check(t, "#close-code data-reason", page.eval(`document.getElementById("close-code").dataset.reason`), "too_many_connections")
	if _, retrying, text := status(); retrying != "true" || !strings.Contains(text, "too_many_connections (4503)") {
		t.Errorf("#status %q, data-retrying=%s; want the reason and retrying", text, retrying)
	}
	// Retries, further and further apart: attempt 2 comes 0.4-0.6 s after
	// the first refusal, attempt 3 0.8-1.2 s after the second.
	page.waitFor("a third attempt scheduled", `document.getElementById("status").textContent.includes("attempt 3")`)
	if n := proxy.metric(t, handshakes("rejected")); n < 2 {
		t.Errorf("the proxy refused %v handshakes as too_many_connections, want the first and a retry", n)
	}
	expectNothing(t, up, 100*time.Millisecond)
	holder.conn.Close()
	page.waitFor("the page to connect once there is room", `document.getElementById("status").dataset.state === "open"`)
	if _, retrying, _ := status(); retrying != "false" {
		t.Errorf("open, data-retrying = %s, want false", retrying)
	}
	select {
	case got := <-up:
		if string(got) != kept {
			t.Fatalf("up channel received %q, want %q", got, kept)
		}
	case <-time.After(processWait):
		t.Fatalf("the message kept while refused never arrived; page: %s", page.state())
	}
	expectNothing(t, up, 500*time.Millisecond) // sent once
}

// page drives examples/browser/index.html in a headless Chromium over the
// DevTools protocol.
type page struct {
	t      *testing.T
	ws     *wsClient
	nextID int
	events []string // methods of the events received while waiting for replies
}

// openPage serves examples/browser, starts Debian's chromium (or skips) and
// opens the page with query.
func openPage(t *testing.T, query url.Values) *page {
	t.Helper()
	chromium, err := exec.LookPath("/usr/bin/chromium")
	if err != nil {
		if chromium, err = exec.LookPath("chromium"); err != nil {
			t.Skip("chromium is not installed (apt-get install chromium): the browser page is not tested")
		}
	}
	pages := httptest.NewServer(http.FileServer(http.Dir("examples/browser")))
	t.Cleanup(pages.Close)
	profile, err := os.MkdirTemp("", "chromium-profile-")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(profile) }) // after Chromium is killed: cleanups run last first
	const devtoolsOrigin = "http://127.0.0.1"
	browser := startProcess(t, "chromium", profile, cleanEnv(), nil, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-breakpad", "--user-data-dir="+profile, "--remote-debugging-port=0",
		"--remote-debugging-address=127.0.0.1", "--remote-allow-origins="+devtoolsOrigin, "about:blank")
	listening := regexp.MustCompile(`DevTools listening on ws://([0-9.:]+)/`)
	devtools := listening.FindStringSubmatch(browser.waitOutput(t, "the DevTools address", listening.MatchString))[1]
	// The blank page Chromium opens is a target of type "page"; Chromium
	// offers no event for it before a DevTools connection exists.
	var target *url.URL
	eventually(t, "chromium's blank page", func() bool {
		var targets []struct{ Type, URL, WebSocketDebuggerURL string }
		if response, err := (&http.Client{Timeout: time.Second}).Get("http://" + devtools + "/json/list"); err == nil {
			json.NewDecoder(response.Body).Decode(&targets)
			response.Body.Close()
		}
		for _, candidate := range targets {
			if candidate.Type == "page" && candidate.URL == "about:blank" {
				target, _ = url.Parse(candidate.WebSocketDebuggerURL)
			}
		}
		return target != nil
	})
	ws, res := dialWS(t, nil, target.Host, target.Path, http.Header{"Origin": {devtoolsOrigin}})
	if ws == nil {
		t.Fatalf("connecting to chromium's DevTools: %d %s", res.status, res.body)
	}
	ws.wait = processWait + 10*time.Second // longer than waitFor's wait inside the page
	p := &page{t: t, ws: ws}
	p.call("Page.enable", map[string]any{})
	p.call("Page.navigate", map[string]any{"url": pages.URL + "/index.html?" + query.Encode()})
	for !slices.Contains(p.events, "Page.loadEventFired") {
		p.receive()
	}
	return p
}

// receive reads one DevTools message, noting the event it may be.
func (p *page) receive() (reply struct {
	ID     int
	Method string
	Result json.RawMessage
	Error  *struct{ Message string }
}) {
	p.t.Helper()
	if err := json.Unmarshal([]byte(p.ws.readText()), &reply); err != nil {
		p.t.Fatalf("DevTools: %v", err)
	}
	if reply.Method != "" {
		p.events = append(p.events, reply.Method)
	}
	return reply
}

// call sends one DevTools command and returns its result.
func (p *page) call(method string, params any) json.RawMessage {
	p.t.Helper()
	p.nextID++
	command, _ := json.Marshal(map[string]any{"id": p.nextID, "method": method, "params": params})
	p.ws.sendText(string(command))
	for {
		if reply := p.receive(); reply.ID == p.nextID {
			if reply.Error != nil {
				p.t.Fatalf("DevTools %s: %s", method, reply.Error.Message)
			}
			return reply.Result
		}
	}
}

// eval evaluates a JavaScript expression in the page, awaiting a promise.
func (p *page) eval(expression string) any {
	p.t.Helper()
	var result struct {
		Result           struct{ Value any }
		ExceptionDetails *struct {
			Text      string
			Exception struct{ Description string }
		}
	}
	raw := p.call("Runtime.evaluate", map[string]any{"expression": expression, "awaitPromise": true, "returnByValue": true})
	if err := json.Unmarshal(raw, &result); err != nil {
		p.t.Fatal(err)
	}
	if result.ExceptionDetails != nil {
		p.t.Fatalf("evaluating %s: %s %s", expression, result.ExceptionDetails.Text, result.ExceptionDetails.Exception.Description)
	}
	return result.Result.Value
}

// waitFor waits, inside the page, until condition is truthy.
func (p *page) waitFor(what, condition string) {
	p.t.Helper()
	expression := fmt.Sprintf(`new Promise(resolve => {
		const deadline = Date.now() + %d;
		const check = () => {
			let value = false;
			try { value = (%s); } catch (e) {}
			if (value) resolve(true);
			else if (Date.now() > deadline) resolve(false);
			else setTimeout(check, 50);
		};
		check();
	})`, processWait.Milliseconds(), condition)
	if p.eval(expression) != true {
		p.t.Fatalf("the page never showed %s; page: %s", what, p.state())
	}
}

// send types text into the page's box and clicks Send.
func (p *page) send(text string) {
	p.eval(`document.getElementById("outgoing").value = ` + jsString(text) + `; document.getElementById("send").click(); true`)
}

// state describes the page for failure messages.
func (p *page) state() string {
	text, _ := p.eval(`JSON.stringify({status: document.getElementById("status").textContent,
		log: [...document.querySelectorAll("#log li")].map(e => e.textContent)})`).(string)
	return text
}

// jsString quotes s as a JavaScript string literal.
func jsString(s string) string {
	quoted, _ := json.Marshal(s)
	return string(quoted)
}

// The FastAPI worker, run with the command examples/README.md gives
// (Debian's python3) on a free port: a session created over HTTP, a
// WebSocket through the proxy, an answer asked over HTTP and over the up
// channel streamed token by token to stream_end, other messages echoed,
// and a clean stop on Ctrl+C.
func TestFastAPIWorker(t *testing.T) {
	command := docCommand(t, "examples/README.md", " -m uvicorn ")
	if err := exec.Command(command[0], "-c", "import fastapi, uvicorn, redis.asyncio").Run(); err != nil {
		t.Skipf("%s cannot import fastapi, uvicorn and redis.asyncio (apt-get install python3-fastapi python3-uvicorn python3-redis): %v", command[0], err)
	}
	r := realRedis(t)
	proxyURL := "ws://" + examplesProxy(t, r, 0).addr
	args, workerPort := slices.Clone(command[1:]), freePort(t)
	if i := slices.Index(args, "--port"); i < 0 || i+1 == len(args) {
		t.Fatalf("examples/README.md: %q names no --port", command)
	} else {
		args[i+1] = strconv.Itoa(workerPort)
	}
	root, err := os.Getwd()
	must(t, err)
	worker := startProcess(t, "fastapi worker", root, cleanEnv("REDIS_URL="+r.url, "WSPROXY_URL="+proxyURL,
		"TOKEN_DELAY_SECS=0.01", "PYTHONDONTWRITEBYTECODE=1"), nil, command[0], append(args, "--host", "127.0.0.1")...)
	worker.waitOutput(t, "uvicorn to listen", func(s string) bool { return strings.Contains(s, "Uvicorn running on") })
	api := fmt.Sprintf("http://127.0.0.1:%d", workerPort)

	var session struct {
		SessionID string `json:"session_id"`
		AgentID   string `json:"agent_id"`
		Token     string `json:"token"`
		WSURL     string `json:"ws_url"`
	}
	postJSON(t, api+"/sessions?agent_id=test-agent", "", http.StatusOK, &session)
	if want := proxyURL + "/test-agent/ws/" + session.SessionID; session.WSURL != want || session.Token == "" || session.AgentID != "test-agent" {
		t.Fatalf("POST /sessions = %+v, want ws_url %s and a token", session, want)
	}
	if stored, _ := redis.String(r.do(t, "GET", "session:"+session.SessionID+":auth"), nil); stored != session.Token {
		t.Fatalf("session:%s:auth holds %q, want the token the worker returned", session.SessionID, stored)
	}
	u, _ := url.Parse(session.WSURL)
	ws, res := dialWS(t, nil, u.Host, u.Path, bearer(session.Token))
	if ws == nil {
		t.Fatalf("connecting to %s: %d %s", session.WSURL, res.status, res.body)
	}
	ws.wait = processWait
	postJSON(t, api+"/sessions/"+session.SessionID+"/ask", `{"prompt":"Why is the sky blue?"}`, http.StatusAccepted, nil)
	expectStream(t, ws, "Why is the sky blue?")
	ws.sendText(`{"prompt":"And the sunset?"}`)
	expectStream(t, ws, "And the sunset?")
	ws.sendText(`{"type":"ping","seq":7}`)
	ws.expectText(`{"type":"data","payload":{"echo":{"type":"ping","seq":7}}}`)
	postJSON(t, api+"/sessions/no-such-session/ask", `{"prompt":"hello?"}`, http.StatusNotFound, nil)
	worker.signal(t, syscall.SIGINT)
	if err := worker.waitExit(processWait); err != nil {
		t.Fatalf("worker after SIGINT: %v", err)
	}
	if output := worker.out.String(); !strings.Contains(output, "Application shutdown complete") || strings.Contains(output, "Traceback") {
		t.Fatalf("worker did not shut down cleanly:\n%s", output)
	}
}

// expectStream reads one streamed answer: at least two data messages with
// text payloads that together mention the prompt, then stream_end.
func expectStream(t *testing.T, ws *wsClient, prompt string) {
	t.Helper()
	var answer strings.Builder
	tokens := 0
	for {
		raw := ws.readText()
		var message struct {
			Type, Command string
			Payload       any
		}
		if err := json.Unmarshal([]byte(raw), &message); err != nil {
			t.Fatalf("message %q is not JSON: %v", raw, err)
		}
		if message.Type == "control" && message.Command == "stream_end" {
			break
		}
		text, ok := message.Payload.(string)
		if message.Type != "data" || !ok {
			t.Fatalf("unexpected message while streaming: %s", raw)
		}
		answer.WriteString(text)
		tokens++
	}
	if tokens < 2 || !strings.Contains(answer.String(), prompt) {
		t.Fatalf("streamed answer %q in %d tokens, want several tokens mentioning %q", answer.String(), tokens, prompt)
	}
}

// postJSON posts body and decodes the answer into result when not nil.
func postJSON(t *testing.T, target, body string, wantStatus int, result any) {
	t.Helper()
	response, err := (&http.Client{Timeout: processWait}).Post(target, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", target, err)
	}
	defer response.Body.Close()
	answer, _ := io.ReadAll(response.Body)
	if response.StatusCode != wantStatus {
		t.Fatalf("POST %s = %d %s, want %d", target, response.StatusCode, answer, wantStatus)
	}
	if result != nil {
		if err := json.Unmarshal(answer, result); err != nil {
			t.Fatalf("POST %s answered %s: %v", target, answer, err)
		}
	}
}

// acceptWebSocket completes a handshake as a server would (RFC 6455 §4.2.2),
// for the tests of the example client, and returns the server's end; nil if
// the connection could not be hijacked.
func acceptWebSocket(w http.ResponseWriter, r *http.Request) *wsClient {
	accept := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	conn, buffered, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return nil
	}
	fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
		base64.StdEncoding.EncodeToString(accept[:]))
	return &wsClient{conn: conn, br: buffered.Reader, server: true}
}

// ws_bidir_client answers a ping that comes more than its write timeout
// (10 s) after the last line it sent: a pong does not inherit the deadline
// of that line's write.
func TestExampleClientAnswersPingsLongAfterItsLastSend(t *testing.T) {
	t.Parallel() // it waits 11 s: beside the other tests that wait
	pong := make(chan frame, 1)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		end := acceptWebSocket(w, r)
		if end == nil {
			return
		}
		defer end.conn.Close()
		if f, err := end.readFrame(processWait); err != nil || string(f.payload) != `{"type":"prompt"}` {
			return
		}
		time.Sleep(11 * time.Second)
		end.writeFrame(true, opPing, []byte("still there?"))
		if f, err := end.readFrame(processWait); err == nil {
			pong <- f
		}
		end.writeFrame(true, opClose, binary.BigEndian.AppendUint16(nil, 1000))
		end.readFrame(processWait)
	}))
	t.Cleanup(server.Close)
	client := startProcess(t, "ws_bidir_client", t.TempDir(), cleanEnv("WSPROXY_URL="+strings.Replace(server.URL, "http://", "ws://", 1)),
		nil, program(t, "ws_bidir_client"), "-ping-interval", "0", "agent-1", "session-1", "secret-token")
	client.waitOutput(t, "connected", func(text string) bool { return strings.Contains(text, "connected\n") })
	fmt.Fprintln(client.stdin, `{"type":"prompt"}`)
	select {
	case f := <-pong:
		check(t, "pong", f, frame{true, opPong, []byte("still there?")})
	case <-time.After(11*time.Second + processWait):
		t.Fatalf("no pong 11 s after the last send:\n%s", client.out)
	}
	if err := client.waitExit(processWait); err != nil {
		t.Errorf("ws_bidir_client: %v\n%s", err, client.out)
	}
}

// ws_bidir_client against a server that splits a message over three frames
// with a ping between them, sends a control error and closes with 4000: the
// client prints the whole message, the control error, the close code and
// reason, sends its token, answers the ping and echoes the close code.
func TestExampleClientReassemblesFragmentsAndReportsClose(t *testing.T) {
	received, authorization := make(chan []frame, 1), make(chan string, 1)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		authorization <- r.Header.Get("Authorization")
		end := acceptWebSocket(w, r)
		if end == nil {
			return
		}
		defer end.conn.Close()
		end.writeFrame(false, opText, []byte("frag"))
		end.writeFrame(true, opPing, []byte("are you there?"))
		end.writeFrame(false, opContinuation, []byte("mented "))
		end.writeFrame(true, opContinuation, []byte("message"))
		end.writeFrame(true, opText, []byte(`{"type":"control","command":"error","code":"invalid_json","message":"messages must be valid JSON"}`))
		end.writeFrame(true, opClose, append(binary.BigEndian.AppendUint16(nil, 4000), "bye"...))
		var frames []frame
		for {
			f, err := end.readFrame(processWait)
			if err != nil {
				break
			}
			if frames = append(frames, f); f.op == opClose {
				break
			}
		}
		received <- frames
	}))
	t.Cleanup(server.Close)
	client := startProcess(t, "ws_bidir_client", t.TempDir(), cleanEnv("WSPROXY_URL="+strings.Replace(server.URL, "http://", "ws://", 1)),
		nil, program(t, "ws_bidir_client"), "-ping-interval", "0", "agent-1", "session-1", "secret-token")
	if err := client.waitExit(processWait); err != nil {
		t.Fatalf("ws_bidir_client: %v\n%s", err, client.out)
	}
	expectLines(t, "ws_bidir_client", client.out.String(), []string{"connecting to ws://127.0.0.1:...", "connected",
		"received: fragmented message", `control error: code=invalid_json message="messages must be valid JSON"`, `closed: code=4000 reason="bye"`})
	check(t, "Authorization", <-authorization, "Bearer secret-token")
	select {
	case frames := <-received:
		if want := []frame{{true, opPong, []byte("are you there?")}, {true, opClose, []byte{0x0f, 0xa0}}}; !reflect.DeepEqual(frames, want) {
			t.Errorf("the client sent %v, want a pong with the ping's data and a close frame echoing 4000: %v", frames, want)
		}
	case <-time.After(processWait):
		t.Fatal("the server never saw the client's close frame")
	}
}

// A refused connect is one handshake (one refusal in the proxy's metrics
// and log), prints the reason on one line and exits with status 3 (refused
// for good) or 4 (for now). Against the proxy, which answers the client's
// Origin header with 101 and a close 4000 + status, "connected" is never
// printed; against a server answering the HTTP status with the proxy's
// JSON body, the message is printed too.
func TestExampleClientRefusal(t *testing.T) {
	r := realRedis(t)
	proxy := examplesProxy(t, r, 0, "MAX_CONNECTIONS=1")
	sessionID, token := r.session(t)
	run := func(wsURL, session, token string, want ...string) int {
		t.Helper()
		client := startProcess(t, "ws_bidir_client", t.TempDir(), cleanEnv("WSPROXY_URL="+wsURL), nil,
			program(t, "ws_bidir_client"), "-ping-interval", "0", "agent-1", session, token)
		status := client.exitStatus(t)
		if got := strings.Split(strings.TrimSpace(client.out.String()), "\n"); !slices.Equal(got, append([]string{"connecting to " + wsURL + "/agent-1/ws/" + session}, want...)) {
			t.Errorf("%s: printed\n%s\nwant exactly the connecting line and\n%s", session, client.out, strings.Join(want, "\n"))
		}
		return status
	}
	for i, tc := range []struct {
		session, token, refusal, result string
		status                          int
	}{
		{"no-such-session", token, "refused: 4401 unknown_session", "unauthorized", 3},
		{sessionID, "wrong-token", "refused: 4403 invalid_token", "forbidden", 3},
		{sessionID, token, "refused: 4503 too_many_connections", "rejected", 4},
	} {
		if tc.result == "rejected" {
			proxy.connect(t, sessionID, token) // the one connection MAX_CONNECTIONS allows
		}
		check(t, tc.refusal+": exit status", run("ws://"+proxy.addr, tc.session, tc.token, tc.refusal), tc.status)
		proxy.expectMetrics(t, map[string]float64{handshakes(tc.result): 1}) // one handshake
		check(t, tc.refusal+": refusals logged in all", strings.Count(proxy.logs.String(), `"msg":"handshake refused"`), i+1)
	}
	// A refusal by HTTP status (the proxy's answer without an Origin
	// header), from a server that counts the handshakes it answers.
	var mu sync.Mutex
	answered := 0
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		answered++
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if strings.HasSuffix(r.URL.Path, "/draining") {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"error":"draining","message":"the server is shutting down; reconnect to another instance"}`)
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"error":"unknown_session","message":"no token is stored for this session"}`)
	}))
	t.Cleanup(server.Close)
	for _, tc := range []struct {
		session, refusal string
		status           int
	}{
		{"gone", "refused: 401 unknown_session: no token is stored for this session", 3},
		{"draining", "refused: 503 draining: the server is shutting down; reconnect to another instance", 4},
	} {
		mu.Lock()
		answered = 0
		mu.Unlock()
		check(t, tc.refusal+": exit status", run(strings.Replace(server.URL, "http://", "ws://", 1), tc.session, token, tc.refusal), tc.status)
		mu.Lock()
		check(t, tc.refusal+": handshakes answered", answered, 1)
		mu.Unlock()
	}
}

// Each example program exits with status 2 and a one-line usage when its
// arguments are wrong.
func TestExamplesRejectBadArguments(t *testing.T) {
	for _, run := range [][]string{
		{"auth_token_setter"}, {"auth_token_setter", "demo", "token", "soon"}, {"auth_token_setter", "bad/session", "token"},
		{"redis_publisher", "one", "two"}, {"redis_publisher", "-interval", "0s"}, {"redis_publisher", "-count", "-1"},
		{"redis_subscriber"}, {"redis_subscriber", "a b"},
		{"ws_bidir_client", "agent-1", "demo"}, {"ws_bidir_client", "agent 1", "demo", "token"},
	} {
		p := startProcess(t, run[0], t.TempDir(), cleanEnv("REDIS_URL=redis://127.0.0.1:1", "WSPROXY_URL=ws://127.0.0.1:1"), nil, program(t, run[0]), run[1:]...)
		if status := p.exitStatus(t); status != 2 || !strings.HasPrefix(p.stderr.String(), "usage: "+run[0]) {
			t.Errorf("%q: exit status %d, stderr %q; want 2 and a usage line", run, status, p.stderr)
		}
	}
}

// What examples/README.md shows but no walkthrough can run, because its
// output differs on every run: the static server of the browser page and
// the FastAPI worker, side by side. Each has a port of its own, neither the
// proxy's nor Redis's; every address in the document is one of the four;
// the page's links go to the static server, the worker's endpoints to the
// worker; the worker runs with Debian's /usr/bin/python3, which sees the
// python3-fastapi, python3-uvicorn and python3-redis packages.
func TestWalkthroughPorts(t *testing.T) {
	const document = "examples/README.md"
	text, err := os.ReadFile(document)
	must(t, err)
	static, worker := docCommand(t, document, " -m http.server "), docCommand(t, document, " -m uvicorn ")
	staticPort, workerPort := static[len(static)-1], ""
	if i := slices.Index(worker, "--port"); i >= 0 && i+1 < len(worker) {
		workerPort = worker[i+1]
	}
	if worker[0] != "/usr/bin/python3" {
		t.Errorf("the worker runs with %s, want Debian's /usr/bin/python3", worker[0])
	}
	if _, err := strconv.Atoi(staticPort); err != nil || staticPort == workerPort || slices.Contains([]string{"", "8080", "6379"}, workerPort) ||
		staticPort == "8080" || staticPort == "6379" {
		t.Fatalf("static server on port %q, worker on %q: want two ports of their own, neither 8080 (the proxy) nor 6379 (Redis)", staticPort, workerPort)
	}
	address := regexp.MustCompile(`(?:127\.0\.0\.1|localhost):(\d+)([^\s>)'` + "`" + `]*)`)
	for n, line := range strings.Split(string(text), "\n") {
		for _, match := range address.FindAllStringSubmatch(line, -1) {
			port, rest, want := match[1], match[2], ""
			switch {
			case strings.Contains(rest, "autoconnect=") || strings.HasPrefix(rest, "/?url="):
				want = staticPort // a link to the page
			case strings.HasPrefix(rest, "/sessions"):
				want = workerPort
			}
			switch {
			case want != "" && port != want:
				t.Errorf("%s:%d: %s: port %s, want %s", document, n+1, match[0], port, want)
			case !slices.Contains([]string{"8080", "6379", staticPort, workerPort}, port):
				t.Errorf("%s:%d: %s: port %s is neither the proxy's, Redis's, the static server's (%s) nor the worker's (%s)",
					document, n+1, match[0], port, staticPort, workerPort)
			}
		}
	}
}

// docCommand returns, split into words, the one command of a document's
// fenced blocks that contains part.
func docCommand(t *testing.T, path, part string) []string {
	t.Helper()
	text, err := os.ReadFile(path)
	must(t, err)
	var found []string
	inBlock := false
	for _, line := range strings.Split(string(text), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "```") {
			inBlock = !inBlock
		} else if inBlock && !strings.HasPrefix(trimmed, "#") && strings.Contains(" "+trimmed+" ", part) {
			found = append(found, trimmed)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s: %d commands contain %q, want 1: %q", path, len(found), part, found)
	}
	words, err := splitWords(found[0])
	must(t, err)
	return words
}

// step is one marked step of a walkthrough.
type step struct {
	line     int    // of the marker, for messages
	terminal int    // N of "terminal N"
	kind     string // "commands", "output", "input", "ctrl+c" or "exit"
	lines    []string
	status   int // of "exit"
}

var walkthroughMarker = regexp.MustCompile(`^<!--\s*walkthrough:\s*terminal\s+(\d+)(?:\s+(output|input|ctrl\+c|exit\s+(\d+)))?\s*-->$`)

// parseWalkthrough reads the marked steps of a markdown document (see
// runWalkthrough).
func parseWalkthrough(path string) ([]step, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(text), "\n")
	var steps []step
	for i := 0; i < len(lines); i++ {
		marker := strings.TrimSpace(lines[i])
		match := walkthroughMarker.FindStringSubmatch(marker)
		if match == nil {
			if strings.HasPrefix(marker, "<!--") && strings.Contains(marker, "walkthrough") {
				return nil, fmt.Errorf("%s:%d: malformed walkthrough marker %q", path, i+1, lines[i])
			}
			continue
		}
		s := step{line: i + 1, kind: cmp.Or(match[2], "commands")}
		s.terminal, _ = strconv.Atoi(match[1])
		if strings.HasPrefix(s.kind, "exit") {
			s.kind = "exit"
			s.status, _ = strconv.Atoi(match[3])
		}
		if s.kind != "ctrl+c" && s.kind != "exit" { // the fenced block must follow, after blank lines at most
			j := i + 1
			for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
				j++
			}
			if j == len(lines) || !strings.HasPrefix(lines[j], "```") {
				return nil, fmt.Errorf("%s:%d: a walkthrough marker must be followed by a fenced block", path, i+1)
			}
			for j++; j < len(lines) && !strings.HasPrefix(lines[j], "```"); j++ {
				if line := strings.TrimRight(lines[j], " \t\r"); line != "" && !(s.kind == "commands" && strings.HasPrefix(line, "#")) {
					s.lines = append(s.lines, line)
				}
			}
			if j == len(lines) {
				return nil, fmt.Errorf("%s:%d: unclosed fenced block", path, i+1)
			}
			i = j
		}
		steps = append(steps, s)
	}
	if len(steps) == 0 {
		return nil, fmt.Errorf("%s has no walkthrough markers (<!-- walkthrough: terminal N --> before a fenced block of commands)", path)
	}
	return steps, nil
}

// terminal is what one terminal of a walkthrough shows.
type terminal struct {
	out     *output
	running *process // nil when the terminal is at its prompt
	matched int      // output lines already matched by output blocks
}

// runWalkthrough runs a document's marked steps in order, against the
// built proxy and examples and the Redis at redisURL. A document marks
// them with HTML comments, invisible once rendered, each followed by a
// fenced block where one is expected:
//
//	<!-- walkthrough: terminal N -->         commands typed in terminal N, one a line
//	<!-- walkthrough: terminal N output -->  lines terminal N prints from then on, in order;
//	                                         "..." stands for any text
//	<!-- walkthrough: terminal N input -->   lines typed into the program running in terminal N
//	<!-- walkthrough: terminal N ctrl+c -->  Ctrl+C in terminal N (no block); it must exit with status 0
//	<!-- walkthrough: terminal N exit S -->  the program in terminal N exits with status S (no block)
//
// A command runs to completion, with status 0, before the next step unless
// an output block or an exit status for its terminal follows it directly
// (then that output is awaited, and a status other than 0 must be the one
// an exit marker names) or it starts the proxy (then /ready is awaited).
// Commands may be `redis-cli ...`, `curl ...`, `go run .` (the proxy) and
// `go run ./examples/NAME ...`, with optional VAR=value prefixes and simple
// shell quoting; anything else fails the test, so a document cannot show a
// step the test skips. redis-cli talks to the test's Redis; curl's
// 127.0.0.1:8080 (or localhost:8080) is the test's proxy. In the output,
// the test's proxy and Redis addresses read as the defaults (127.0.0.1:8080
// and 127.0.0.1:6379).
func runWalkthrough(t *testing.T, steps []step, redisURL string) {
	proxyPort := strconv.Itoa(freePort(t))
	redisAddress := strings.TrimPrefix(redisURL, "redis://")
	if u, err := url.Parse(redisURL); err == nil {
		redisAddress = u.Host
	}
	env := cleanEnv("REDIS_URL="+redisURL, "HOST=127.0.0.1", "PORT="+proxyPort, "WSPROXY_URL=ws://127.0.0.1:"+proxyPort)
	toTest := strings.NewReplacer("127.0.0.1:8080", "127.0.0.1:"+proxyPort, "localhost:8080", "localhost:"+proxyPort)
	normalize := strings.NewReplacer("127.0.0.1:"+proxyPort, "127.0.0.1:8080", redisAddress, "127.0.0.1:6379")
	workDir := t.TempDir() // not the repository: no .env file is read by accident
	terminals := map[int]*terminal{}
	t.Cleanup(func() {
		if t.Failed() {
			for n, term := range terminals {
				t.Logf("terminal %d printed:\n%s", n, term.out)
			}
		}
	})
	for i, s := range steps {
		where := fmt.Sprintf("line %d (terminal %d)", s.line, s.terminal)
		if terminals[s.terminal] == nil {
			terminals[s.terminal] = &terminal{out: newOutput()}
		}
		term := terminals[s.terminal]
		next := func(kinds ...string) bool {
			return i+1 < len(steps) && steps[i+1].terminal == s.terminal && slices.Contains(kinds, steps[i+1].kind)
		}
		if s.kind != "commands" && s.kind != "output" && term.running == nil {
			t.Fatalf("%s: %s for a terminal that runs nothing", where, s.kind)
		}
		switch s.kind {
		case "commands":
			for k, line := range s.lines {
				if term.running != nil { // the user waits for the prompt
					if err := term.running.waitExit(processWait); err != nil {
						t.Fatalf("%s: before %q: %v (does the document miss a Ctrl+C?)", where, line, err)
					}
				}
				name, path, args, extraEnv, err := walkthroughCommand(t, line, redisURL, toTest)
				if err != nil {
					t.Fatalf("%s: %v", where, err)
				}
				fmt.Fprintf(term.out, "$ %s\n", line)
				term.running = startProcess(t, name, workDir, append(slices.Clone(env), extraEnv...), term.out, path, args...)
				switch {
				case name == "the proxy":
					(&proxyProcess{endpoint{"127.0.0.1:" + proxyPort, term.out}, term.running}).waitReady(t)
				case k == len(s.lines)-1 && next("output", "exit"):
					// The output block or exit status that follows says when it is ready.
				default:
					if err := term.running.waitExit(processWait); err != nil {
						t.Fatalf("%s: %q: %v", where, line, err)
					}
					term.running = nil
				}
			}
		case "output":
			var stop <-chan struct{}
			if term.running != nil {
				stop = term.running.exited
			}
			term.out.await(t, fmt.Sprintf("%s: output\n%s", where, strings.Join(s.lines, "\n")), stop, func(text string) bool {
				end, ok := matchLines(strings.Split(normalize.Replace(text), "\n")[term.matched:], s.lines)
				if ok {
					term.matched += end
				}
				return ok
			})
			if term.running != nil && term.running.hasExited() {
				switch {
				case term.running.err == nil:
					term.running = nil
				case !next("exit"):
					t.Fatalf("%s: %s: %v", where, term.running.name, term.running.err)
				}
			}
		case "input":
			for _, line := range s.lines {
				fmt.Fprintf(term.out, "%s\n", line) // a terminal echoes what is typed
				if _, err := io.WriteString(term.running.stdin, line+"\n"); err != nil {
					t.Fatalf("%s: typing into %s: %v", where, term.running.name, err)
				}
			}
		case "ctrl+c":
			term.running.signal(t, syscall.SIGINT)
			if err := term.running.waitExit(processWait); err != nil {
				t.Fatalf("%s: %s after Ctrl+C: %v", where, term.running.name, err)
			}
			term.running = nil
		case "exit":
			check(t, where+": exit status", term.running.exitStatus(t), s.status)
			term.running = nil
		}
	}
}

// assignment is a VAR=value word before a command.
var assignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// walkthroughCommand maps one walkthrough command to the program the test
// runs: redis-cli against the test's Redis, curl with the test's proxy
// address, or a built binary.
func walkthroughCommand(t *testing.T, line, redisURL string, proxyAddress *strings.Replacer) (name, path string, args, env []string, err error) {
	words, err := splitWords(line)
	for err == nil && len(words) > 0 && assignment.MatchString(words[0]) {
		env, words = append(env, words[0]), words[1:]
	}
	switch {
	case err != nil:
		return "", "", nil, nil, err
	case len(words) >= 1 && (words[0] == "redis-cli" || words[0] == "curl"):
		if path, err = exec.LookPath(words[0]); err != nil {
			return "", "", nil, nil, fmt.Errorf("%s is not installed", words[0])
		}
		if words[0] == "redis-cli" { // --no-raw: replies as on a terminal ("(integer) 1")
			return "redis-cli", path, append([]string{"-u", redisURL, "--no-raw"}, words[1:]...), env, nil
		}
		for _, word := range words[1:] {
			args = append(args, proxyAddress.Replace(word))
		}
		return "curl", path, args, env, nil
	case len(words) >= 3 && words[0] == "go" && words[1] == "run" && words[2] == ".":
		return "the proxy", program(t, "wsproxy"), words[3:], env, nil
	case len(words) >= 3 && words[0] == "go" && words[1] == "run" && strings.HasPrefix(words[2], "./examples/"):
		example := strings.TrimPrefix(words[2], "./examples/")
		if _, err := os.Stat(program(t, example)); err != nil {
			return "", "", nil, nil, fmt.Errorf("%q: no example program %s", line, example)
		}
		return example, program(t, example), words[3:], env, nil
	}
	return "", "", nil, nil, fmt.Errorf("%q: the walkthrough test runs only redis-cli, curl, `go run .` and `go run ./examples/NAME`", line)
}

// splitWords splits a command line as a POSIX shell would, for the quoting
// walkthroughs use: 'single', "double" with \" \\ \$, and \x. Variables,
// globs, pipes and the like are refused rather than misread.
func splitWords(line string) ([]string, error) {
	var words []string
	var word strings.Builder
	inWord := false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				words = append(words, word.String())
				word.Reset()
				inWord = false
			}
			continue
		case c == '\'':
			end := strings.IndexByte(line[i+1:], '\'')
			if end < 0 {
				return nil, fmt.Errorf("%q: unclosed '", line)
			}
			word.WriteString(line[i+1 : i+1+end])
			i += end + 1
		case c == '"':
			for i++; i < len(line) && line[i] != '"'; i++ {
				if line[i] == '$' || line[i] == '`' {
					return nil, fmt.Errorf("%q: shell expansions are not supported in walkthroughs", line)
				}
				if line[i] == '\\' && i+1 < len(line) && strings.IndexByte(`"\$`+"`", line[i+1]) >= 0 {
					i++
				}
				word.WriteByte(line[i])
			}
			if i == len(line) {
				return nil, fmt.Errorf("%q: unclosed \"", line)
			}
		case c == '\\' && i+1 < len(line):
			i++
			word.WriteByte(line[i])
		case strings.IndexByte("$`|&;<>()*?[]{}", c) >= 0 || (c == '~' && !inWord):
			return nil, fmt.Errorf("%q: %q is not supported in walkthrough commands (quote it)", line, c)
		default:
			word.WriteByte(c)
		}
		inWord = true
	}
	if inWord {
		words = append(words, word.String())
	}
	return words, nil
}

// matchLines finds want, in order, among lines (other lines may come in
// between); "..." in a wanted line matches any text. It returns how many
// lines were consumed.
func matchLines(lines, want []string) (consumed int, ok bool) {
	next := 0
	for _, pattern := range want {
		parts := strings.Split(pattern, "...")
		for i, part := range parts {
			parts[i] = regexp.QuoteMeta(part)
		}
		re := regexp.MustCompile("^" + strings.Join(parts, ".*") + "$")
		for next < len(lines) && !re.MatchString(strings.TrimRight(lines[next], " \r")) {
			next++
		}
		if next == len(lines) {
			return 0, false
		}
		next++
	}
	return next, true
}

// expectLines fails unless output contains want in order (see matchLines).
func expectLines(t *testing.T, name, output string, want []string) {
	t.Helper()
	if _, ok := matchLines(strings.Split(output, "\n"), want); !ok {
		t.Fatalf("%s printed:\n%s\nwant, in order:\n%s", name, output, strings.Join(want, "\n"))
	}
}

// ---------------------------------------------------------------------------
// Benchmarks of the hot paths (README: Performance, row 7), which must stay
// allocation-free: go test -run '^$' -bench . -benchmem

// benchConns returns n connections of one session, open on real loopback
// sockets whose far ends are read and discarded.
func benchConns(b testing.TB, n int) (*proxy, []*conn) {
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"MAX_BUFFER_SIZE_BYTES": "1000000000", "MAX_TOTAL_BUFFER_BYTES": "1000000000"}[k]
	})
	if err != nil {
		b.Fatal(err)
	}
	p := newProxy(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var conns []*conn
	for i := 0; i < n; i++ {
		client, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		server, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		go io.Copy(io.Discard, client) // ends when server closes
		c := &conn{p: p, started: true}
		c.attach(server, nil)
		p.hub.channels["session:bench:down"] = append(p.hub.channels["session:bench:down"], c)
		conns = append(conns, c)
		b.Cleanup(func() { c.writers.Wait(); server.Close(); client.Close() })
	}
	return p, conns
}

// BenchmarkDispatch is the Redis reader's work per message for a session
// with 10 connections, up to queueing (the writers are held back).
func BenchmarkDispatch(b *testing.B) {
	p, conns := benchConns(b, 10)
	for _, c := range conns {
		c.started = false // queue only
	}
	message := []byte(`{"type":"data","payload":"a token of an answer, 64 bytes long...."}`)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.hub.dispatch("session:bench:down", message, time.Now().UnixNano())
		if i%1024 == 1023 {
			for _, c := range conns {
				c.mu.Lock()
				clear(c.queue)
				c.queue = c.queue[:0]
				c.account(-c.queued)
				c.mu.Unlock()
			}
		}
	}
}

// BenchmarkWritePath is a message from the dispatcher to the client's
// socket: queue, writer, frame encoding, write, accounting.
func BenchmarkWritePath(b *testing.B) {
	p, conns := benchConns(b, 1)
	message := []byte(`{"type":"data","payload":"a token of an answer, 64 bytes long...."}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(message)))
	b.ResetTimer()
	wait := func(n int) { // for the writer to catch up, as a reading client lets it
		for p.metrics.messagesDown.Load() < int64(n) {
			runtime.Gosched()
		}
	}
	for i := 0; i < b.N; i++ {
		p.hub.dispatch("session:bench:down", message, time.Now().UnixNano())
		p.hub.flush() // as the subscriber does once it has dispatched what it read
		if i%4096 == 4095 {
			wait(i - 4096)
		}
	}
	wait(b.N)
	if conns[0].closing {
		b.Fatalf("the connection closed: %s", conns[0].reason)
	}
}

// ---------------------------------------------------------------------------
// The fake Redis (README: Testing), and its own tests

// fakeRedis is an in-process Redis speaking RESP2 over a real TCP socket,
// with switches to misbehave on demand. It knows the commands wsproxy and its
// tests use; anything else is answered "-ERR unknown command". All databases
// share one keyspace. One mutex guards all state; its cond, changed, is
// broadcast on every change that a writer goroutine or a test may wait for.
type fakeRedis struct {
	listener net.Listener
	wg       sync.WaitGroup // the accept loop and every connection's two goroutines

	mu             sync.Mutex
	changed        *sync.Cond
	keys           map[string]fakeEntry
	channels       map[string]map[*fakeConn]bool // subscribers by channel
	conns          map[*fakeConn]bool
	commands       []string // upper-cased names, in the order they were executed
	clockOffset    time.Duration
	password       string
	failPublish    string
	holdSubscribes bool
	subscribeDelay time.Duration
	refuse         bool
	frozen         bool
	stopped        bool
}

type fakeEntry struct {
	value    string
	expireAt time.Time // zero: no expiry
}

// TTL results for a key without expiry and for a missing key, as Redis's TTL.
const (
	fakeTTLNone    time.Duration = -1
	fakeTTLMissing time.Duration = -2
)

// fakeWaitTimeout bounds every Wait* helper.
const fakeWaitTimeout = 5 * time.Second

// fakeConn is one client connection. readLoop parses and executes commands;
// writeLoop owns the socket's writes and sends queued replies in order.
type fakeConn struct {
	srv      *fakeRedis
	netConn  net.Conn
	channels map[string]bool // guarded by srv.mu, as are the fields below
	authed   bool
	out      []fakeReply
	closed   bool
}

// fakeReply is one encoded reply waiting in a connection's queue. A held or
// delayed reply also holds back everything queued after it.
type fakeReply struct {
	data       []byte
	held       bool      // SUBSCRIBE confirmation made while HoldSubscribes was on
	notBefore  time.Time // SUBSCRIBE confirmation under DelaySubscribes
	closeAfter bool      // QUIT's +OK
}

// newFakeRedis listens on 127.0.0.1:0; t.Cleanup stops it and closes every connection.
func newFakeRedis(t testing.TB) *fakeRedis {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	r := &fakeRedis{listener: listener, keys: map[string]fakeEntry{},
		channels: map[string]map[*fakeConn]bool{}, conns: map[*fakeConn]bool{}}
	r.changed = sync.NewCond(&r.mu)
	r.wg.Add(1)
	go r.acceptLoop()
	t.Cleanup(func() {
		r.mu.Lock()
		r.stopped = true // a connection accepted from now on is closed at once
		r.mu.Unlock()
		listener.Close()
		r.DropConnections()
		r.wg.Wait()
	})
	return r
}

func (r *fakeRedis) acceptLoop() {
	defer r.wg.Done()
	for {
		netConn, err := r.listener.Accept()
		if err != nil {
			return // the listener was closed by Cleanup
		}
		r.mu.Lock()
		if r.refuse || r.stopped {
			netConn.Close()
		} else {
			c := &fakeConn{srv: r, netConn: netConn, channels: map[string]bool{}, authed: r.password == ""}
			r.conns[c] = true
			r.wg.Add(2)
			go c.readLoop()
			go c.writeLoop()
			r.changed.Broadcast()
		}
		r.mu.Unlock()
	}
}

func (r *fakeRedis) Addr() string { return r.listener.Addr().String() }
func (r *fakeRedis) URL() string  { return "redis://" + r.Addr() }

// Set stores key without expiry, like SET key value.
func (r *fakeRedis) Set(key, value string) { r.with(func() { r.keys[key] = fakeEntry{value: value} }) }

func (r *fakeRedis) Get(key string) (value string, ok bool) {
	r.with(func() {
		var entry fakeEntry
		entry, ok = r.lookupLocked(key)
		value = entry.value
	})
	return value, ok
}

// TTL returns the key's remaining time to live, fakeTTLNone or fakeTTLMissing.
func (r *fakeRedis) TTL(key string) (ttl time.Duration) {
	r.with(func() { ttl = r.ttlLocked(key) })
	return ttl
}

// FastForward moves the fake's clock on by d, so keys expire without waiting.
func (r *fakeRedis) FastForward(d time.Duration) { r.with(func() { r.clockOffset += d }) }

// Publish delivers payload to every subscriber, as a worker's PUBLISH would,
// and returns how many connections received it. FailPublish does not apply.
func (r *fakeRedis) Publish(channel string, payload []byte) (receivers int) {
	r.with(func() { receivers = r.publishLocked(channel, string(payload)) })
	return receivers
}

// Subscribers returns how many connections are subscribed to channel now.
func (r *fakeRedis) Subscribers(channel string) (n int) {
	r.with(func() { n = len(r.channels[channel]) })
	return n
}

// SubscribedChannels returns the channels with at least one subscriber, sorted.
func (r *fakeRedis) SubscribedChannels() (channels []string) {
	r.with(func() { channels = slices.Sorted(maps.Keys(r.channels)) })
	return channels
}

// Conns returns the number of open client connections.
func (r *fakeRedis) Conns() (n int) {
	r.with(func() { n = len(r.conns) })
	return n
}

// Commands returns the upper-cased names of all executed commands, in order.
func (r *fakeRedis) Commands() (names []string) {
	r.with(func() { names = slices.Clone(r.commands) })
	return names
}

// CommandCount returns how many times the named command was executed.
func (r *fakeRedis) CommandCount(name string) int {
	count := 0
	for _, command := range r.Commands() {
		if strings.EqualFold(command, name) {
			count++
		}
	}
	return count
}

// WaitSubscribers waits until exactly n connections are subscribed to channel.
// Like t.Fatal, call it from the test's goroutine.
func (r *fakeRedis) WaitSubscribers(t testing.TB, channel string, n int) {
	t.Helper()
	r.waitFor(t, "subscribers of "+channel, func() int { return len(r.channels[channel]) }, n)
}

// WaitConns waits until exactly n client connections are open.
func (r *fakeRedis) WaitConns(t testing.TB, n int) {
	t.Helper()
	r.waitFor(t, "open connections", func() int { return len(r.conns) }, n)
}

func (r *fakeRedis) waitFor(t testing.TB, what string, current func() int, want int) {
	t.Helper()
	timedOut := false
	timer := time.AfterFunc(fakeWaitTimeout, func() { r.with(func() { timedOut = true }) })
	defer timer.Stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for current() != want {
		if timedOut {
			t.Fatalf("fake redis: waited %v for %d %s, have %d", fakeWaitTimeout, want, what, current())
		}
		r.changed.Wait()
	}
}

// HoldSubscribes(true) lets SUBSCRIBE take effect but withholds its
// confirmations, and everything queued after them on that connection, until
// HoldSubscribes(false) releases them in order.
func (r *fakeRedis) HoldSubscribes(hold bool) {
	r.with(func() {
		r.holdSubscribes = hold
		for c := range r.conns {
			for i := range c.out {
				c.out[i].held = c.out[i].held && hold // released ones stay released
			}
		}
	})
}

// DelaySubscribes delays each later SUBSCRIBE confirmation (and what follows it) by d.
func (r *fakeRedis) DelaySubscribes(d time.Duration) { r.with(func() { r.subscribeDelay = d }) }

// FailPublish makes PUBLISH answer "-ERR <message>"; "" restores it.
func (r *fakeRedis) FailPublish(message string) { r.with(func() { r.failPublish = message }) }

// RefuseConnections(true) closes each new connection as soon as it is accepted.
func (r *fakeRedis) RefuseConnections(refuse bool) { r.with(func() { r.refuse = refuse }) }

// Freeze(true) makes the server hang, its connections half-open: on every
// connection, new ones included, nothing is executed or sent and nothing is
// closed (a client's close goes unnoticed too) until Freeze(false) or
// DropConnections. Commands received meanwhile are executed on Freeze(false).
func (r *fakeRedis) Freeze(freeze bool) { r.with(func() { r.frozen = freeze }) }

// RequirePassword makes connections opened from now on need AUTH pw first.
func (r *fakeRedis) RequirePassword(pw string) { r.with(func() { r.password = pw }) }

// DropConnections closes every client connection abruptly, like a Redis
// restart; the keyspace is kept. Subscriptions are gone when it returns.
func (r *fakeRedis) DropConnections() {
	r.with(func() {
		for c := range r.conns {
			c.closeLocked()
		}
	})
}

// with runs f under the lock, then wakes everyone waiting for a change.
func (r *fakeRedis) with(f func()) {
	r.mu.Lock()
	f()
	r.mu.Unlock()
	r.changed.Broadcast()
}

func (r *fakeRedis) now() time.Time { return time.Now().Add(r.clockOffset) }

// lookupLocked returns a live key, deleting it if it has expired.
func (r *fakeRedis) lookupLocked(key string) (fakeEntry, bool) {
	entry, ok := r.keys[key]
	if ok && !entry.expireAt.IsZero() && !r.now().Before(entry.expireAt) {
		delete(r.keys, key)
		return fakeEntry{}, false
	}
	return entry, ok
}

func (r *fakeRedis) ttlLocked(key string) time.Duration {
	entry, ok := r.lookupLocked(key)
	switch {
	case !ok:
		return fakeTTLMissing
	case entry.expireAt.IsZero():
		return fakeTTLNone
	}
	return entry.expireAt.Sub(r.now())
}

func (r *fakeRedis) publishLocked(channel, payload string) int {
	for c := range r.channels[channel] {
		c.sendLocked([]any{"message", channel, payload})
	}
	return len(r.channels[channel])
}

func (c *fakeConn) readLoop() {
	r := c.srv
	defer r.wg.Done()
	reader := bufio.NewReader(c.netConn)
	for {
		args, err := fakeReadCommand(reader)
		r.mu.Lock()
		for r.frozen && !c.closed {
			r.changed.Wait()
		}
		if err != nil || c.closed {
			c.closeLocked()
			r.mu.Unlock()
			return
		}
		keepReading := len(args) == 0 || c.executeLocked(args)
		r.mu.Unlock()
		if !keepReading {
			return
		}
	}
}

func (c *fakeConn) writeLoop() {
	r := c.srv
	defer r.wg.Done()
	r.mu.Lock()
	defer r.mu.Unlock()
	for !c.closed {
		n, closeAfter := c.sendableLocked()
		if n == 0 {
			r.changed.Wait()
			continue
		}
		var data []byte
		for _, reply := range c.out[:n] {
			data = append(data, reply.data...)
		}
		c.out = c.out[n:]
		r.mu.Unlock()
		_, err := c.netConn.Write(data)
		r.mu.Lock()
		if err != nil || closeAfter {
			c.closeLocked()
		}
	}
}

// sendableLocked counts the queued replies that may be written now: none while
// frozen, and none from the first held or delayed confirmation on.
func (c *fakeConn) sendableLocked() (n int, closeAfter bool) {
	if c.srv.frozen {
		return 0, false
	}
	now := time.Now()
	for _, reply := range c.out {
		if reply.held && c.srv.holdSubscribes || now.Before(reply.notBefore) {
			break
		}
		n++
		if reply.closeAfter {
			return n, true
		}
	}
	return n, false
}

func (c *fakeConn) closeLocked() {
	if c.closed {
		return
	}
	c.closed = true
	c.netConn.Close()
	for channel := range c.channels {
		c.unsubscribeLocked(channel)
	}
	delete(c.srv.conns, c)
	c.srv.changed.Broadcast()
}

func (c *fakeConn) sendLocked(reply any) { c.enqueueLocked(fakeReply{data: fakeEncode(nil, reply)}) }

// enqueueLocked queues a reply and wakes the writer.
func (c *fakeConn) enqueueLocked(reply fakeReply) {
	c.out = append(c.out, reply)
	c.srv.changed.Broadcast()
}

func (c *fakeConn) unsubscribeLocked(channel string) {
	delete(c.channels, channel)
	delete(c.srv.channels[channel], c)
	if len(c.srv.channels[channel]) == 0 {
		delete(c.srv.channels, channel)
	}
}

// fakeArity follows Redis's convention: n means exactly n words including the
// command's name, -n at least n.
var fakeArity = map[string]int{"PING": -1, "ECHO": 2, "GET": 2, "SET": -3, "EXPIRE": 3, "TTL": 2,
	"DEL": -2, "PUBLISH": 3, "SUBSCRIBE": -2, "UNSUBSCRIBE": -1, "AUTH": -2, "SELECT": 2, "QUIT": -1}

// executeLocked runs one command and queues its replies. It returns false
// after QUIT, whose reply closes the connection once written.
func (c *fakeConn) executeLocked(args []string) (keepReading bool) {
	r := c.srv
	name := strings.ToUpper(args[0])
	r.commands = append(r.commands, name)
	arity, known := fakeArity[name]
	switch {
	case !known:
		c.sendLocked(fakeError(fmt.Sprintf("ERR unknown command '%s'", args[0])))
	case arity > 0 && len(args) != arity || len(args) < -arity || name == "AUTH" && len(args) > 3:
		c.sendLocked(fakeError(fmt.Sprintf("ERR wrong number of arguments for '%s' command", strings.ToLower(name))))
	case !c.authed && name != "AUTH" && name != "QUIT":
		c.sendLocked(fakeError("NOAUTH Authentication required."))
	case len(c.channels) > 0 && !slices.Contains([]string{"SUBSCRIBE", "UNSUBSCRIBE", "PING", "QUIT"}, name):
		c.sendLocked(fakeError(fmt.Sprintf("ERR Can't execute '%s': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context", strings.ToLower(name))))
	case name == "QUIT":
		c.enqueueLocked(fakeReply{data: []byte("+OK\r\n"), closeAfter: true})
		return false
	case name == "SUBSCRIBE":
		for _, channel := range args[1:] {
			c.channels[channel] = true
			if r.channels[channel] == nil {
				r.channels[channel] = map[*fakeConn]bool{}
			}
			r.channels[channel][c] = true
			c.enqueueLocked(fakeReply{data: fakeEncode(nil, []any{"subscribe", channel, len(c.channels)}),
				held: r.holdSubscribes, notBefore: time.Now().Add(r.subscribeDelay)})
			if r.subscribeDelay > 0 {
				time.AfterFunc(r.subscribeDelay, r.changed.Broadcast) // wakes the writer when due
			}
		}
	case name == "UNSUBSCRIBE":
		channels := args[1:]
		if len(channels) == 0 {
			channels = slices.Sorted(maps.Keys(c.channels))
		}
		if len(channels) == 0 {
			c.sendLocked([]any{"unsubscribe", nil, 0})
		}
		for _, channel := range channels {
			c.unsubscribeLocked(channel)
			c.sendLocked([]any{"unsubscribe", channel, len(c.channels)})
		}
	default:
		c.sendLocked(c.replyLocked(name, args))
	}
	return true
}

// replyLocked runs a command that has exactly one reply and returns it.
func (c *fakeConn) replyLocked(name string, args []string) any {
	r := c.srv
	switch name {
	case "PING":
		if len(c.channels) > 0 {
			return []any{"pong", strings.Join(args[1:], "")}
		} else if len(args) > 1 {
			return args[1]
		}
		return fakeStatus("PONG")
	case "ECHO":
		return args[1]
	case "GET":
		if entry, ok := r.lookupLocked(args[1]); ok {
			return entry.value
		}
		return nil
	case "SET":
		entry := fakeEntry{value: args[2]}
		if len(args) > 3 {
			seconds, err := strconv.Atoi(args[len(args)-1])
			if len(args) != 5 || !strings.EqualFold(args[3], "EX") || err != nil || seconds <= 0 {
				return fakeError("ERR syntax error (this fake knows only SET key value [EX seconds])")
			}
			entry.expireAt = r.now().Add(time.Duration(seconds) * time.Second)
		}
		r.keys[args[1]] = entry
		return fakeStatus("OK")
	case "EXPIRE":
		seconds, err := strconv.Atoi(args[2])
		if err != nil {
			return fakeError("ERR value is not an integer or out of range")
		}
		entry, ok := r.lookupLocked(args[1])
		if !ok {
			return 0
		}
		entry.expireAt = r.now().Add(time.Duration(seconds) * time.Second)
		r.keys[args[1]] = entry
		r.lookupLocked(args[1]) // a non-positive TTL deletes the key, as in Redis
		return 1
	case "TTL":
		if ttl := r.ttlLocked(args[1]); ttl < 0 {
			return int(ttl) // fakeTTLNone or fakeTTLMissing, as Redis answers
		} else {
			return int((ttl + time.Second/2) / time.Second)
		}
	case "DEL":
		deleted := 0
		for _, key := range args[1:] {
			if _, ok := r.lookupLocked(key); ok {
				delete(r.keys, key)
				deleted++
			}
		}
		return deleted
	case "PUBLISH":
		if r.failPublish != "" {
			return fakeError("ERR " + r.failPublish)
		}
		return r.publishLocked(args[1], args[2])
	case "AUTH":
		if r.password == "" {
			return fakeError("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?")
		} else if args[len(args)-1] != r.password || len(args) == 3 && args[1] != "default" {
			return fakeError("WRONGPASS invalid username-password pair or user is disabled.")
		}
		c.authed = true
		return fakeStatus("OK")
	case "SELECT": // all databases share one keyspace
		if db, err := strconv.Atoi(args[1]); err != nil || db < 0 || db > 15 {
			return fakeError("ERR DB index is out of range")
		}
		return fakeStatus("OK")
	}
	panic("fake redis: no reply for " + name) // fakeArity lists a command not handled here
}

type (
	fakeStatus string // encoded as a RESP simple string, +OK
	fakeError  string // encoded as a RESP error, -ERR ...
)

// fakeEncode appends v in RESP2: string is a bulk string, nil a null bulk
// string, int an integer, []any an array.
func fakeEncode(buf []byte, v any) []byte {
	switch v := v.(type) {
	case nil:
		return append(buf, "$-1\r\n"...)
	case fakeStatus:
		return fmt.Appendf(buf, "+%s\r\n", v)
	case fakeError:
		return fmt.Appendf(buf, "-%s\r\n", v)
	case int:
		return fmt.Appendf(buf, ":%d\r\n", v)
	case string:
		return fmt.Appendf(buf, "$%d\r\n%s\r\n", len(v), v)
	case []any:
		buf = fmt.Appendf(buf, "*%d\r\n", len(v))
		for _, item := range v {
			buf = fakeEncode(buf, item)
		}
		return buf
	}
	panic(fmt.Sprintf("fakeEncode: unsupported %T", v))
}

// fakeReadCommand reads one command: a RESP array of bulk strings, as client
// libraries send, or an inline line such as "PING\r\n", as typed into telnet.
func fakeReadCommand(reader *bufio.Reader) ([]string, error) {
	line, err := reader.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimRight(line, "\r\n")
	if !strings.HasPrefix(line, "*") {
		return strings.Fields(line), nil
	}
	count, err := strconv.Atoi(line[1:])
	if err != nil {
		return nil, fmt.Errorf("fake redis: bad array header %q", line)
	}
	args := make([]string, 0, max(count, 0))
	for range count {
		header, err := reader.ReadString('\n')
		if err != nil {
			return nil, err
		}
		size, err := strconv.Atoi(strings.TrimRight(strings.TrimPrefix(header, "$"), "\r\n"))
		if !strings.HasPrefix(header, "$") || err != nil || size < 0 {
			return nil, fmt.Errorf("fake redis: bad bulk string header %q", header)
		}
		data := make([]byte, size+2)
		if _, err := io.ReadFull(reader, data); err != nil {
			return nil, err
		}
		args = append(args, string(data[:size]))
	}
	return args, nil
}

// Self-tests of the fake, with redigo as the client, as wsproxy uses it.

func fakeDial(t *testing.T, fake *fakeRedis) redis.Conn {
	t.Helper()
	conn, err := redis.DialURL(fake.URL())
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// fakeExpectDo runs a command and checks its reply as redigo returns it:
// status "OK" as a string, bulk strings as []byte, integers as int64.
func fakeExpectDo(t *testing.T, conn redis.Conn, want any, command string, args ...any) {
	t.Helper()
	reply, err := conn.Do(command, args...)
	check(t, fmt.Sprint(command, args), []any{reply, err}, []any{want, nil})
}

// fakeExpectError runs a command and checks that Redis answers an error containing part.
func fakeExpectError(t *testing.T, conn redis.Conn, part string, command string, args ...any) {
	t.Helper()
	if _, err := conn.Do(command, args...); err == nil || !strings.Contains(err.Error(), part) {
		t.Fatalf("%s %v: error %v, want one containing %q", command, args, err, part)
	}
}

func fakeDialRaw(t *testing.T, fake *fakeRedis) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", fake.Addr())
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// fakeReadRaw reads exactly len(want) bytes from a raw socket and compares them.
func fakeReadRaw(t *testing.T, conn net.Conn, want string) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(fakeWaitTimeout))
	got := make([]byte, len(want))
	_, err := io.ReadFull(conn, got)
	check(t, "raw read", []any{string(got), err}, []any{want, nil})
}

// fakeExpectSilence asserts that nothing arrives on conn for a short while:
// absence cannot be signalled, so this is the one bounded wait.
func fakeExpectSilence(t *testing.T, conn net.Conn) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	n, err := conn.Read(make([]byte, 1))
	if netErr, ok := err.(net.Error); n != 0 || !ok || !netErr.Timeout() {
		t.Fatalf("expected silence, got %d bytes, error %v", n, err)
	}
}

func TestFakeRedisKeys(t *testing.T) {
	fake := newFakeRedis(t)
	conn := fakeDial(t, fake)
	fakeExpectDo(t, conn, "OK", "SET", "k", "v\x00\xff", "EX", 100)
	value, ok := fake.Get("k")
	check(t, "Get", []any{value, ok}, []any{"v\x00\xff", true})
	fakeExpectDo(t, conn, int64(100), "TTL", "k")
	fakeExpectDo(t, conn, int64(1), "EXPIRE", "k", 10)
	fakeExpectDo(t, conn, int64(0), "EXPIRE", "missing", 10)
	fake.FastForward(11 * time.Second)
	fakeExpectDo(t, conn, nil, "GET", "k")
	fakeExpectDo(t, conn, int64(-2), "TTL", "k")
	fake.Set("a", "1")
	fake.Set("b", "2")
	check(t, "TTL without expiry", fake.TTL("a"), fakeTTLNone)
	fakeExpectDo(t, conn, int64(2), "DEL", "a", "b", "c")
	fakeExpectDo(t, conn, []byte("hi"), "ECHO", "hi")
	fakeExpectError(t, conn, "unknown command", "FLUSHALL")
	check(t, "CommandCount(set)", fake.CommandCount("set"), 1)
	fakeExpectDo(t, conn, "OK", "QUIT")
	fake.WaitConns(t, 0)
}

func TestFakeRedisPubSub(t *testing.T) {
	fake := newFakeRedis(t)
	sub := redis.PubSubConn{Conn: fakeDial(t, fake)}
	receive := func(want any) {
		t.Helper()
		check(t, "pubsub receive", sub.ReceiveWithTimeout(fakeWaitTimeout), want)
	}
	sub.Subscribe("a", "b")
	receive(redis.Subscription{Kind: "subscribe", Channel: "a", Count: 1})
	receive(redis.Subscription{Kind: "subscribe", Channel: "b", Count: 2})
	sub.Subscribe("a") // already subscribed: Redis confirms anyway
	receive(redis.Subscription{Kind: "subscribe", Channel: "a", Count: 2})
	check(t, "SubscribedChannels", fake.SubscribedChannels(), []string{"a", "b"})
	check(t, "Subscribers", fake.Subscribers("a"), 1)

	fakeExpectDo(t, fakeDial(t, fake), int64(1), "PUBLISH", "a", "x\x00y")
	check(t, "Publish", fake.Publish("b", []byte{0xff}), 1)
	check(t, "Publish without subscribers", fake.Publish("c", []byte("lost")), 0)
	receive(redis.Message{Channel: "a", Data: []byte("x\x00y")})
	receive(redis.Message{Channel: "b", Data: []byte{0xff}})
	sub.Ping("")
	receive(redis.Pong{})
	sub.Conn.Send("GET", "k")
	sub.Conn.Flush()
	if err, ok := sub.Receive().(redis.Error); !ok || !strings.Contains(err.Error(), "Can't execute 'get'") {
		t.Fatalf("GET in subscribed mode: %v", err)
	}

	sub.Unsubscribe()
	receive(redis.Subscription{Kind: "unsubscribe", Channel: "a", Count: 1})
	receive(redis.Subscription{Kind: "unsubscribe", Channel: "b", Count: 0})
	sub.Unsubscribe() // nothing left: one reply with a nil channel
	receive(redis.Subscription{Kind: "unsubscribe", Channel: "", Count: 0})
	check(t, "channels after UNSUBSCRIBE", len(fake.SubscribedChannels()), 0)
	check(t, "CommandCount(SUBSCRIBE)", fake.CommandCount("SUBSCRIBE"), 2)
}

func TestFakeRedisPipelining(t *testing.T) {
	conn := fakeDial(t, newFakeRedis(t))
	for i := range 100 {
		conn.Send("SET", i, i*i)
		conn.Send("GET", i)
	}
	conn.Flush() // one write carrying all 200 commands
	for i := range 100 {
		set, setErr := conn.Receive()
		get, getErr := conn.Receive()
		check(t, "replies", []any{set, setErr, get, getErr}, []any{"OK", nil, []byte(strconv.Itoa(i * i)), nil})
	}
}

func TestFakeRedisHoldSubscribesKeepsReplyOrder(t *testing.T) {
	fake := newFakeRedis(t)
	raw := fakeDialRaw(t, fake)
	fake.HoldSubscribes(true)
	io.WriteString(raw, "PING\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
	fake.WaitSubscribers(t, "ch", 1) // the subscription took effect...
	check(t, "Publish while held", fake.Publish("ch", []byte("m")), 1)
	io.WriteString(raw, "PING\r\n")
	fakeReadRaw(t, raw, "+PONG\r\n") // ...replies before it were sent...
	fakeExpectSilence(t, raw)        // ...but neither its confirmation nor what follows.
	fakeExpectDo(t, fakeDial(t, fake), "PONG", "PING")
	fake.HoldSubscribes(false)
	fakeReadRaw(t, raw, "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"+
		"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n"+
		"*2\r\n$4\r\npong\r\n$0\r\n\r\n")

	const delay = 100 * time.Millisecond
	fake.DelaySubscribes(delay)
	conn := fakeDial(t, fake)
	start := time.Now()
	conn.Send("SUBSCRIBE", "d")
	conn.Send("PING")
	conn.Flush()
	subscribed, subscribeErr := conn.Receive()
	pong, pongErr := conn.Receive()
	check(t, "delayed replies", []any{subscribed, subscribeErr, pong, pongErr}, []any{
		[]any{[]byte("subscribe"), []byte("d"), int64(1)}, nil, []any{[]byte("pong"), []byte("")}, nil})
	if elapsed := time.Since(start); elapsed < delay {
		t.Fatalf("delayed SUBSCRIBE and PING answered after %v, want at least %v", elapsed, delay)
	}
}

func TestFakeRedisFailPublish(t *testing.T) {
	fake := newFakeRedis(t)
	conn := fakeDial(t, fake)
	fake.FailPublish("boom")
	fakeExpectError(t, conn, "ERR boom", "PUBLISH", "a", "x")
	fake.FailPublish("")
	fakeExpectDo(t, conn, int64(0), "PUBLISH", "a", "x")
}

func TestFakeRedisDropAndRefuseConnections(t *testing.T) {
	fake := newFakeRedis(t)
	fake.Set("k", "v")
	sub := redis.PubSubConn{Conn: fakeDial(t, fake)}
	sub.Subscribe("a")
	fake.WaitSubscribers(t, "a", 1)
	fake.DropConnections()
	check(t, "Conns after drop", fake.Conns(), 0)
	check(t, "Subscribers after drop", fake.Subscribers("a"), 0)
	for { // the confirmation may have made it; then the connection ends
		if _, ended := sub.ReceiveWithTimeout(fakeWaitTimeout).(error); ended {
			break
		}
	}
	fresh := fakeDial(t, fake)
	fakeExpectDo(t, fresh, []byte("v"), "GET", "k")

	fake.RefuseConnections(true)
	refused, err := redis.Dial("tcp", fake.Addr())
	if err == nil {
		_, err = refused.Do("PING")
		refused.Close()
	}
	if err == nil {
		t.Fatal("PING on a refused connection succeeded")
	}
	fakeExpectDo(t, fresh, "PONG", "PING")
	check(t, "Conns while refusing", fake.Conns(), 1)
	fake.RefuseConnections(false)
	fakeExpectDo(t, fakeDial(t, fake), "PONG", "PING")
}

func TestFakeRedisFreeze(t *testing.T) {
	fake := newFakeRedis(t)
	raw := fakeDialRaw(t, fake)
	io.WriteString(raw, "PING\r\n")
	fakeReadRaw(t, raw, "+PONG\r\n")
	fake.Freeze(true)
	io.WriteString(raw, "PING\r\n")
	fakeExpectSilence(t, raw)
	check(t, "PINGs executed while frozen", fake.CommandCount("PING"), 1)
	check(t, "Conns while frozen", fake.Conns(), 1)
	fake.Freeze(false)
	fakeReadRaw(t, raw, "+PONG\r\n")
}

func TestFakeRedisAuthAndSelect(t *testing.T) {
	fake := newFakeRedis(t)
	fake.RequirePassword("secret")
	fakeExpectError(t, fakeDial(t, fake), "NOAUTH", "GET", "k")
	if _, err := redis.DialURL("redis://:wrong@" + fake.Addr()); err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Fatalf("dial with a wrong password: %v", err)
	}
	if _, err := redis.DialURL("redis://:secret@" + fake.Addr() + "/16"); err == nil || !strings.Contains(err.Error(), "out of range") {
		t.Fatalf("dial with db 16: %v", err)
	}
	conn, err := redis.DialURL("redis://:secret@" + fake.Addr() + "/3")
	must(t, err)
	defer conn.Close()
	fakeExpectDo(t, conn, "PONG", "PING")
	check(t, "CommandCount(SELECT)", fake.CommandCount("SELECT"), 2)
}
