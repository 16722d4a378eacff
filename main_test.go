package main

// Tests run the proxy in-process on a real socket, and talk to it with a
// small WebSocket client of their own (so they can send fragments, withhold
// pongs and read close codes). Redis is the fake below, which speaks RESP
// over TCP and misbehaves on demand; set WSPROXY_TEST_REDIS_URL to run the
// tests that do not need misbehaviour against a real Redis instead.

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"debug/elf"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
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
	"golang.org/x/net/websocket"
)

// ---------------------------------------------------------------------------
// Harness

// testRedis is the Redis a test talks to: the fake, or a real one.
type testRedis struct {
	url  string
	fake *fakeRedis // nil for a real Redis
}

// newTestRedis returns the real Redis of WSPROXY_TEST_REDIS_URL if set, else
// a fake. Tests that need the fake to misbehave call newFakeRedis instead.
func newTestRedis(t testing.TB) *testRedis {
	if u := os.Getenv("WSPROXY_TEST_REDIS_URL"); u != "" {
		return &testRedis{url: u}
	}
	f := newFakeRedis(t)
	return &testRedis{url: f.URL(), fake: f}
}

func fakeTarget(t testing.TB) (*testRedis, *fakeRedis) {
	f := newFakeRedis(t)
	return &testRedis{url: f.URL(), fake: f}, f
}

func (r *testRedis) do(t testing.TB, cmd string, args ...any) any {
	t.Helper()
	c, err := redis.DialURL(r.url)
	if err != nil {
		t.Fatalf("dial redis: %v", err)
	}
	defer c.Close()
	v, err := c.Do(cmd, args...)
	if err != nil {
		t.Fatalf("redis %s: %v", cmd, err)
	}
	return v
}

// subscribers is how many clients are subscribed to channel (-1: unknown).
func (r *testRedis) subscribers(channel string) int {
	if r.fake != nil {
		return r.fake.Subscribers(channel)
	}
	return countSubscribers(r.url, channel)
}

// countSubscribers is numSub for goroutines other than the test's.
func countSubscribers(url, channel string) int {
	c, err := redis.DialURL(url)
	if err != nil {
		return -1
	}
	defer c.Close()
	v, err := redis.Values(c.Do("PUBSUB", "NUMSUB", channel))
	if err != nil || len(v) != 2 {
		return -1
	}
	n, _ := redis.Int(v[1], nil)
	return n
}

// waitNumSub waits until channel has n subscribers.
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

// subscribeUp listens on a session's up channel; messages arrive on the result.
func (r *testRedis) subscribeUp(t testing.TB, sessionID string) <-chan []byte {
	t.Helper()
	c, err := redis.DialURL(r.url)
	if err != nil {
		t.Fatal(err)
	}
	psc := redis.PubSubConn{Conn: c}
	if err := psc.Subscribe("session:" + sessionID + ":up"); err != nil {
		t.Fatal(err)
	}
	if _, ok := psc.Receive().(redis.Subscription); !ok {
		t.Fatal("no subscription confirmation")
	}
	out := make(chan []byte, 100)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			switch v := psc.Receive().(type) {
			case redis.Message:
				out <- v.Data
			case error:
				return
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return out
}

func (r *testRedis) publish(t testing.TB, sessionID string, message string) int {
	t.Helper()
	n, _ := redis.Int(r.do(t, "PUBLISH", "session:"+sessionID+":down", message), nil)
	return n
}

// testProxy is a proxy running in-process with run(), as main runs it.
type testProxy struct {
	addr    string
	cfg     *config
	p       *proxy
	logs    *syncBuffer
	signals chan os.Signal
	done    chan error
}

// startProxy runs a proxy on 127.0.0.1 against redis with env overriding
// test defaults. It is drained and stopped at the end of the test.
func startProxy(t testing.TB, r *testRedis, env ...string) *testProxy {
	t.Helper()
	vars := map[string]string{"REDIS_URL": r.url, "LOG_LEVEL": "debug", "SHUTDOWN_GRACE_PERIOD_SECS": "0"}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	cfg, err := loadConfig(func(k string) string { return vars[k] })
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tp := &testProxy{addr: ln.Addr().String(), cfg: cfg, logs: &syncBuffer{}, signals: make(chan os.Signal, 2), done: make(chan error, 1)}
	tp.p = newProxy(cfg, newLogger(cfg, tp.logs))
	go func() { tp.done <- tp.p.run(ln, tp.signals) }()
	t.Cleanup(func() {
		tp.stop(t)
		if t.Failed() {
			t.Logf("proxy logs:\n%s", tp.logs.String())
		}
	})
	if r.url != "redis://127.0.0.1:1" {
		eventually(t, "proxy ready", func() bool { return tp.p.hub.connected() })
	}
	return tp
}

// stop sends the proxy a signal and waits for run to return.
func (tp *testProxy) stop(t testing.TB) {
	select {
	case tp.signals <- os.Interrupt:
	default:
	}
	select {
	case err := <-tp.done:
		if err != nil {
			t.Errorf("run: %v", err)
		}
		tp.done <- err // stop may be called twice
	case <-time.After(20 * time.Second):
		t.Errorf("proxy did not stop")
	}
}

func (tp *testProxy) url(path string) string { return "http://" + tp.addr + path }

func (tp *testProxy) get(t testing.TB, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(tp.url(path))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// metric returns the value of one exposition line, e.g.
// `wsproxy_messages_total{direction="up"}`.
func (tp *testProxy) metric(t testing.TB, series string) float64 {
	t.Helper()
	_, body := tp.get(t, "/metrics")
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			fmt.Sscan(rest, &v)
			return v
		}
	}
	t.Fatalf("metric %s not found in:\n%s", series, body)
	return 0
}

// connect opens a WebSocket for a session with its token in the header and
// fails the test unless it gets 101.
func (tp *testProxy) connect(t testing.TB, sessionID, token string) *wsClient {
	t.Helper()
	c, resp := tp.dial(t, "/agent-1/ws/"+sessionID, http.Header{"Authorization": {"Bearer " + token}})
	if c == nil {
		t.Fatalf("handshake: %d %s", resp.status, resp.body)
	}
	return c
}

type handshakeResult struct {
	status int
	body   string
	code   string // the "error" field of the body
	header http.Header
}

// dial sends a WebSocket handshake with extra headers. It returns the client
// on 101, or the refusal.
func (tp *testProxy) dial(t testing.TB, path string, header http.Header) (*wsClient, handshakeResult) {
	t.Helper()
	return dialWS(t, tp.addr, path, header, true)
}

func dialWS(t testing.TB, addr, path string, header http.Header, upgrade bool) (*wsClient, handshakeResult) {
	t.Helper()
	c, res, err := tryDial(addr, path, header, upgrade)
	if err != nil {
		t.Fatal(err)
	}
	if c != nil {
		c.t = t
		t.Cleanup(func() { c.conn.Close() })
	}
	return c, res
}

// tryDial is dialWS for goroutines other than the test's.
func tryDial(addr, path string, header http.Header, upgrade bool) (*wsClient, handshakeResult, error) {
	return tryDialWith(&net.Dialer{}, addr, path, header, upgrade)
}

// smallBuffer dials with a 4 KiB receive buffer, so that a client that
// stops reading stops taking bytes almost at once.
var smallBuffer = &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
	return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
}}

func tryDialWith(d *net.Dialer, addr, path string, header http.Header, upgrade bool) (*wsClient, handshakeResult, error) {
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, handshakeResult{}, err
	}
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	if upgrade {
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString([]byte(randomID()[:16])))
		req.Header.Set("Sec-WebSocket-Version", "13")
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if host := header.Get("Host"); host != "" {
		req.Host = host // req.Write takes it from here
	}
	if err := req.Write(nc); err != nil {
		nc.Close()
		return nil, handshakeResult{}, err
	}
	nc.SetReadDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		nc.Close()
		return nil, handshakeResult{}, fmt.Errorf("reading handshake response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		nc.Close()
		var e struct{ Error string }
		json.Unmarshal(body, &e)
		return nil, handshakeResult{resp.StatusCode, string(body), e.Error, resp.Header}, nil
	}
	nc.SetReadDeadline(time.Time{})
	return &wsClient{conn: nc, br: br, autoPong: true}, handshakeResult{status: 101, header: resp.Header}, nil
}

// wsClient is a minimal RFC 6455 client for tests.
type wsClient struct {
	t        testing.TB
	conn     net.Conn
	br       *bufio.Reader
	autoPong bool // answer pings while reading
	pings    int
}

type frame struct {
	fin     bool
	op      byte
	payload []byte
}

func (c *wsClient) writeFrame(fin bool, op byte, payload []byte) error {
	masked := make([]byte, len(payload))
	for i := range payload {
		masked[i] = payload[i] ^ byte(i%4+1) // the mask is 1 2 3 4
	}
	_, err := c.conn.Write(append(clientFrameHeader(fin, op, uint64(len(payload))), masked...))
	return err
}

// clientFrameHeader encodes a client frame's header with the mask 1 2 3 4, for
// any length, even one a client must not send.
func clientFrameHeader(fin bool, op byte, n uint64) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	hdr := []byte{b0}
	switch {
	case n <= 125:
		hdr = append(hdr, 0x80|byte(n))
	case n <= 0xFFFF:
		hdr = append(hdr, 0x80|126, byte(n>>8), byte(n))
	default:
		hdr = binary.BigEndian.AppendUint64(append(hdr, 0x80|127), n)
	}
	return append(hdr, 1, 2, 3, 4)
}

func (c *wsClient) sendText(s string) {
	c.t.Helper()
	if err := c.writeFrame(true, opText, []byte(s)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// readFrame reads one frame as it arrives.
func (c *wsClient) readFrame(timeout time.Duration) (frame, error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	var hdr [2]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return frame{}, err
	}
	if hdr[1]&0x80 != 0 {
		return frame{}, errors.New("server frame is masked")
	}
	n := int64(hdr[1] & 0x7f)
	switch n {
	case 126:
		var ext [2]byte
		if _, err := io.ReadFull(c.br, ext[:]); err != nil {
			return frame{}, err
		}
		n = int64(binary.BigEndian.Uint16(ext[:]))
	case 127:
		var ext [8]byte
		if _, err := io.ReadFull(c.br, ext[:]); err != nil {
			return frame{}, err
		}
		n = int64(binary.BigEndian.Uint64(ext[:]))
	}
	f := frame{fin: hdr[0]&0x80 != 0, op: hdr[0] & 0x0f, payload: make([]byte, n)}
	_, err := io.ReadFull(c.br, f.payload)
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
func (c *wsClient) read() frame {
	c.t.Helper()
	f, err := c.next(5 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	if f.op == opClose {
		c.t.Fatalf("read: got close %d %q", closeCode(f.payload), f.payload[min(2, len(f.payload)):])
	}
	return f
}

func (c *wsClient) readText() string {
	c.t.Helper()
	f := c.read()
	if f.op != opText {
		c.t.Fatalf("want a text frame, got opcode %d", f.op)
	}
	return string(f.payload)
}

// controlError reads the next message and returns its code, failing unless
// it is a control error.
func (c *wsClient) controlError() string {
	c.t.Helper()
	var m struct{ Type, Command, Code, Message string }
	text := c.readText()
	if err := json.Unmarshal([]byte(text), &m); err != nil || m.Type != "control" || m.Command != "error" || m.Message == "" {
		c.t.Fatalf("want a control error, got %s", text)
	}
	return m.Code
}

// expectClose skips data until the close frame and returns its code and
// reason; 1006 when the connection ended without one.
func (c *wsClient) expectClose(timeout time.Duration) (int, string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		f, err := c.next(time.Until(deadline))
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				c.t.Fatalf("no close within %v", timeout)
			}
			return 1006, err.Error()
		}
		if f.op == opClose {
			return closeCode(f.payload), string(f.payload[min(2, len(f.payload)):])
		}
	}
}

func closeCode(payload []byte) int {
	if len(payload) < 2 {
		return 1005
	}
	return int(binary.BigEndian.Uint16(payload))
}

// syncBuffer collects the proxy's logs.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// eventually polls cond until it holds, for conditions no signal announces
// (a metric, a count in Redis).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func randomID() string {
	b := make([]byte, 12)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func makeJWT(secret string, header, claims map[string]any) string {
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	signing := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signing))
	return signing + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// ---------------------------------------------------------------------------
// SPEC §1: endpoints

func TestEndpoints(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	for _, tc := range []struct {
		method, path string
		status       int
		body         string
	}{
		{"GET", "/health", 200, `{"active_connections":0,"redis":"connected","status":"healthy"}`},
		{"GET", "/ready", 200, `{"status":"ready"}`},
		{"GET", "/nope", 404, `"error":"not_found"`},
		{"GET", "/a/ws/b/c", 404, `"error":"not_found"`},
		{"POST", "/health", 405, `"error":"method_not_allowed"`},
		{"DELETE", "/metrics", 405, `"error":"method_not_allowed"`},
		{"POST", "/agent/ws/session", 405, `"error":"method_not_allowed"`},
	} {
		req, _ := http.NewRequest(tc.method, tp.url(tc.path), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.body) {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.body)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: Content-Type %q", tc.method, tc.path, ct)
		}
	}
	status, body := tp.get(t, "/metrics")
	if status != 200 || !strings.Contains(body, "# TYPE wsproxy_active_connections gauge") {
		t.Errorf("/metrics: %d %s", status, body)
	}
}

func TestHealthAndReadyWhenRedisIsDown(t *testing.T) {
	tp := startProxy(t, &testRedis{url: "redis://127.0.0.1:1"})
	if status, body := tp.get(t, "/health"); status != 503 || !strings.Contains(body, `"status":"unhealthy"`) || !strings.Contains(body, `"redis":"disconnected"`) {
		t.Errorf("/health: %d %s", status, body)
	}
	if status, body := tp.get(t, "/ready"); status != 503 || !strings.Contains(body, `"status":"redis_unavailable"`) {
		t.Errorf("/ready: %d %s", status, body)
	}
}

// ---------------------------------------------------------------------------
// SPEC §2: the handshake

func TestHandshakeRefusals(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "ALLOWED_ORIGINS=https://app.example.com, https://other.example.com")
	id, token := r.session(t)
	bearer := http.Header{"Authorization": {"Bearer " + token}}
	long := strings.Repeat("a", 129)
	for _, tc := range []struct {
		name    string
		path    string
		header  http.Header
		upgrade bool
		status  int
		code    string
	}{
		{"bad agent id", "/bad%20agent/ws/" + id, bearer, true, 400, "bad_request"},
		{"session id too long", "/agent/ws/" + long, bearer, true, 400, "bad_request"},
		{"bad session id before missing token", "/agent/ws/x*y", nil, true, 400, "bad_request"},
		{"not an upgrade", "/agent/ws/" + id, bearer, false, 400, "bad_request"},
		{"wrong version", "/agent/ws/" + id, http.Header{"Authorization": {"Bearer " + token}, "Sec-Websocket-Version": {"8"}}, true, 400, "bad_request"},
		{"missing token", "/agent/ws/" + id, nil, true, 401, "missing_token"},
		{"unknown session", "/agent/ws/nosuchsession", bearer, true, 401, "unknown_session"},
		{"invalid token", "/agent/ws/" + id, http.Header{"Authorization": {"Bearer wrong"}}, true, 403, "invalid_token"},
		{"invalid query token", "/agent/ws/" + id + "?token=wrong", nil, true, 403, "invalid_token"},
	} {
		_, res := dialWS(t, tp.addr, tc.path, tc.header, tc.upgrade)
		if res.status != tc.status || res.code != tc.code {
			t.Errorf("%s: got %d %s, want %d %s", tc.name, res.status, res.body, tc.status, tc.code)
		}
	}
	// Allowed origins and clients without an Origin header get in.
	for _, origin := range []string{"https://other.example.com", ""} {
		h := http.Header{"Authorization": {"Bearer " + token}}
		if origin != "" {
			h.Set("Origin", origin)
		}
		c, res := tp.dial(t, "/agent/ws/"+id, h)
		if c == nil {
			t.Fatalf("origin %q: %d %s", origin, res.status, res.body)
		}
		c.conn.Close()
	}
	eventually(t, "no subscriptions left", func() bool { return len(sessionChannels(fake)) == 0 })
	if got := tp.metric(t, `wsproxy_connections_total{result="bad_request"}`); got != 5 {
		t.Errorf("bad_request count %v, want 5", got)
	}
	if got := tp.metric(t, `wsproxy_connections_total{result="unauthorized"}`); got != 2 {
		t.Errorf("unauthorized count %v, want 2", got)
	}
	if got := tp.metric(t, `wsproxy_connections_total{result="forbidden"}`); got != 2 {
		t.Errorf("forbidden count %v, want 2", got)
	}
	if strings.Contains(tp.logs.String(), token) {
		t.Errorf("a token appears in the logs")
	}
}

func TestHandshakeDrainingAndTooManyConnections(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_CONNECTIONS=2")
	id, token := r.session(t)
	tp.connect(t, id, token)
	tp.connect(t, id, token)
	_, res := tp.dial(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}})
	if res.status != 503 || res.code != "too_many_connections" {
		t.Errorf("third connection: %d %s", res.status, res.body)
	}
	tp.p.draining.Store(true) // as the first signal does; TestShutdown* cover the signal itself
	_, res = tp.dial(t, "/agent/ws/"+id, nil)
	if res.status != 503 || res.code != "draining" {
		t.Errorf("while draining: %d %s", res.status, res.body)
	}
	if got := tp.metric(t, `wsproxy_connections_total{result="rejected"}`); got != 2 {
		t.Errorf("rejected count %v, want 2", got)
	}
}

func TestHandshakeRedisFailures(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.3", "SUBSCRIBE_TIMEOUT_SECS=0.3")
	id, token := r.session(t)
	header := http.Header{"Authorization": {"Bearer " + token}}

	fake.HoldSubscribes(true)
	_, res := tp.dial(t, "/agent/ws/"+id, header)
	if res.status != 504 || res.code != "subscribe_timeout" {
		t.Errorf("withheld confirmation: %d %s", res.status, res.body)
	}
	fake.HoldSubscribes(false)
	r.waitNumSub(t, "session:"+id+":down", 0) // the late confirmation is followed by UNSUBSCRIBE

	fake.Freeze(true)
	_, res = tp.dial(t, "/agent/ws/"+id, header)
	if res.status != 504 || res.code != "auth_timeout" {
		t.Errorf("frozen Redis: %d %s", res.status, res.body)
	}
	fake.Freeze(false)
	fake.DropConnections()
	fake.RefuseConnections(true)
	eventually(t, "subscriber lost", func() bool { return !tp.p.hub.connected() })
	_, res = tp.dial(t, "/agent/ws/"+id, header)
	if res.status != 503 || res.code != "redis_unavailable" {
		t.Errorf("Redis down: %d %s", res.status, res.body)
	}
	if got := tp.metric(t, `wsproxy_connections_total{result="timeout"}`); got != 2 {
		t.Errorf("timeout count %v, want 2", got)
	}
	if got := tp.metric(t, `wsproxy_connections_total{result="unavailable"}`); got != 1 {
		t.Errorf("unavailable count %v, want 1", got)
	}
}

// ---------------------------------------------------------------------------
// SPEC §3: authentication

func TestAuthRedisRefreshesTTL(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=120")
	id, token := r.session(t) // stored with EX 600
	c := tp.connect(t, id, token)
	ttl, _ := redis.Int(r.do(t, "TTL", "session:"+id+":auth"), nil)
	if ttl <= 0 || ttl > 120 {
		t.Errorf("TTL after connect %d, want the grace period 120", ttl)
	}
	r.do(t, "EXPIRE", "session:"+id+":auth", 600)
	c.writeFrame(true, opClose, []byte{3, 232})
	c.expectClose(5 * time.Second)
	eventually(t, "TTL restarted at disconnect", func() bool {
		ttl, _ := redis.Int(r.do(t, "TTL", "session:"+id+":auth"), nil)
		return ttl > 0 && ttl <= 120
	})
	// Reconnecting with the same token within the grace period works.
	tp.connect(t, id, token)
	// The query parameter works as well as the header.
	c2, res := tp.dial(t, "/agent/ws/"+id+"?token="+token, nil)
	if c2 == nil {
		t.Errorf("?token=: %d %s", res.status, res.body)
	}
}

func TestAuthRedisSingleUseToken(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_GRACE_PERIOD_SECS=0")
	id, token := r.session(t)
	tp.connect(t, id, token)
	if v := r.do(t, "GET", "session:"+id+":auth"); v != nil {
		t.Errorf("the single-use key still exists: %s", v)
	}
	_, res := tp.dial(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}})
	if res.status != 401 || res.code != "unknown_session" {
		t.Errorf("second use: %d %s", res.status, res.body)
	}
}

func TestAuthJWT(t *testing.T) {
	secret := strings.Repeat("s", 32)
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_MODE=jwt", "JWT_SECRET="+secret)
	hs := map[string]any{"alg": "HS256", "typ": "JWT"}
	now := time.Now().Unix()
	for _, tc := range []struct {
		name   string
		token  string
		status int
		code   string
	}{
		{"valid", makeJWT(secret, hs, map[string]any{"session_id": "s1", "exp": now + 60, "nbf": now - 1}), 101, ""},
		{"no exp", makeJWT(secret, hs, map[string]any{"session_id": "s1"}), 101, ""},
		{"expired", makeJWT(secret, hs, map[string]any{"session_id": "s1", "exp": now - 1}), 403, "token_expired"},
		{"not yet valid", makeJWT(secret, hs, map[string]any{"session_id": "s1", "nbf": now + 60}), 403, "token_not_yet_valid"},
		{"other session", makeJWT(secret, hs, map[string]any{"session_id": "s2"}), 403, "session_mismatch"},
		{"wrong secret", makeJWT(strings.Repeat("x", 32), hs, map[string]any{"session_id": "s1"}), 403, "invalid_token"},
		{"alg none", strings.TrimRight(makeJWT(secret, map[string]any{"alg": "none"}, map[string]any{"session_id": "s1"}), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") + ".", 403, "invalid_token"},
		{"alg HS512", makeJWT(secret, map[string]any{"alg": "HS512"}, map[string]any{"session_id": "s1"}), 403, "invalid_token"},
		{"garbage", "not.a.jwt", 403, "invalid_token"},
		{"missing", "", 401, "missing_token"},
	} {
		header := http.Header{}
		if tc.token != "" {
			header.Set("Authorization", "Bearer "+tc.token)
		}
		c, res := tp.dial(t, "/agent/ws/s1", header)
		if res.status != tc.status || res.code != tc.code {
			t.Errorf("%s: %d %s, want %d %s", tc.name, res.status, res.body, tc.status, tc.code)
		}
		if c != nil {
			c.conn.Close()
		}
	}
}

func TestAuthNone(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_MODE=none")
	c := tp.connect(t, "anything", "")
	r.publish(t, "anything", `{"ok":true}`)
	if got := c.readText(); got != `{"ok":true}` {
		t.Errorf("got %s", got)
	}
	if !strings.Contains(tp.logs.String(), "AUTH_MODE=none") {
		t.Errorf("no start-up warning for AUTH_MODE=none")
	}
}

// ---------------------------------------------------------------------------
// SPEC §2 step 6: subscribe before 101, under concurrency

// The first message published the moment the handshake completes arrives,
// even when Redis is slow to confirm the subscription.
func TestSubscribeBefore101(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	fake.DelaySubscribes(200 * time.Millisecond)
	for i := 0; i < 5; i++ {
		id, token := r.session(t)
		c := tp.connect(t, id, token)
		if n := r.publish(t, id, `{"first":true}`); n != 1 {
			t.Fatalf("publish right after 101 reached %d subscribers", n)
		}
		if got := c.readText(); got != `{"first":true}` {
			t.Fatalf("got %s", got)
		}
	}
}

// A handshake is released by its own SUBSCRIBE's confirmation, not by the
// channel being subscribed already for another connection.
func TestSubscribeWaitsForOwnConfirmation(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	first := tp.connect(t, id, token)
	fake.HoldSubscribes(true)
	type result struct {
		c   *wsClient
		res handshakeResult
	}
	second := make(chan result, 1)
	go func() {
		c, res, _ := tryDial(tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
		second <- result{c, res}
	}()
	eventually(t, "second SUBSCRIBE sent", func() bool { return fake.CommandCount("SUBSCRIBE") >= 2 }) // first, second
	select {
	case res := <-second:
		t.Fatalf("handshake completed before its confirmation: %d", res.res.status)
	case <-time.After(300 * time.Millisecond):
	}
	fake.HoldSubscribes(false)
	got := <-second
	if got.c == nil {
		t.Fatalf("second handshake: %d %s", got.res.status, got.res.body)
	}
	got.c.t = t
	defer got.c.conn.Close()
	r.publish(t, id, `"both"`)
	if a, b := first.readText(), got.c.readText(); a != `"both"` || b != `"both"` {
		t.Errorf("got %s and %s", a, b)
	}
}

// A connection that arrives while the previous connection's UNSUBSCRIBE is
// in flight still ends up subscribed before its 101.
func TestSubscribeWhileUnsubscribeInFlight(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	channel := "session:" + id + ":down"
	old := tp.connect(t, id, token)

	// Withhold replies from here on, so that the UNSUBSCRIBE below stays
	// unanswered while the new SUBSCRIBE is sent.
	fake.HoldSubscribes(true)
	otherID, otherToken := r.session(t)
	go tryDial(tp.addr, "/agent/ws/"+otherID, http.Header{"Authorization": {"Bearer " + otherToken}}, true)
	eventually(t, "held SUBSCRIBE", func() bool { return fake.Subscribers("session:"+otherID+":down") == 1 })
	old.writeFrame(true, opClose, []byte{3, 232})
	eventually(t, "UNSUBSCRIBE sent", func() bool { return fake.Subscribers(channel) == 0 })

	done := make(chan *wsClient, 1)
	go func() {
		c, _, _ := tryDial(tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
		done <- c
	}()
	eventually(t, "new SUBSCRIBE sent", func() bool { return fake.Subscribers(channel) == 1 })
	fake.HoldSubscribes(false)
	c := <-done
	if c == nil {
		t.Fatal("reconnect refused")
	}
	c.t = t
	defer c.conn.Close()
	if n := r.publish(t, id, `"after"`); n != 1 {
		t.Fatalf("%d subscribers after the reconnect", n)
	}
	if got := c.readText(); got != `"after"` {
		t.Errorf("got %s", got)
	}
}

// Many connections of a few sessions come and go at once; each one is
// subscribed at its 101 and nothing is left subscribed at the end.
func TestSubscribeChurnUnderConcurrency(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	if r.fake != nil {
		r.fake.DelaySubscribes(time.Millisecond)
	}
	sessions := make([][2]string, 4)
	for i := range sessions {
		id, token := r.session(t)
		sessions[i] = [2]string{id, token}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for w := 0; w < 20; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				s := sessions[(w+i)%len(sessions)]
				c, res, err := tryDial(tp.addr, "/agent/ws/"+s[0], http.Header{"Authorization": {"Bearer " + s[1]}}, true)
				if c == nil {
					errs <- fmt.Errorf("handshake: %d %v", res.status, err)
					return
				}
				if n := r.subscribers("session:" + s[0] + ":down"); n != 1 {
					errs <- fmt.Errorf("open connection, but %d subscribers", n)
				}
				c.conn.Close()
			}
		}(w)
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

// ---------------------------------------------------------------------------
// SPEC §4: forwarding

func TestDownForwardingInOrderByteForByte(t *testing.T) {
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
		for i, want := range messages {
			if got := c.readText(); got != want {
				t.Fatalf("message %d: got %.40q, want %.40q", i, got, want)
			}
		}
	}
	r.publish(t, other, `"only for the bystander"`)
	if got := bystander.readText(); got != `"only for the bystander"` {
		t.Errorf("bystander got %s", got)
	}
	eventually(t, "down count", func() bool {
		return tp.metric(t, `wsproxy_messages_total{direction="down"}`) == float64(2*len(messages)+1)
	})
}

func TestDownNonUTF8IsBinary(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	payload := string([]byte{0xff, 0x00, 0xfe, 'a'})
	r.publish(t, id, payload)
	f := c.read()
	if f.op != opBinary || string(f.payload) != payload {
		t.Errorf("got opcode %d %q", f.op, f.payload)
	}
}

func TestUpForwarding(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_MESSAGE_SIZE_BYTES=300000")
	id, token := r.session(t)
	up := r.subscribeUp(t, id)
	c := tp.connect(t, id, token)
	sent := []string{`{"a":1}`, ` [1, 2, "ü"] `, `"just a string"`}
	for _, m := range sent {
		c.sendText(m)
	}
	// A message split over three frames with a ping between them, as
	// browsers send messages over about 128 KiB.
	big := `{"big":"` + strings.Repeat("y", 200000) + `"}`
	c.writeFrame(false, opText, []byte(big[:70000]))
	c.writeFrame(true, opPing, []byte("between"))
	c.writeFrame(false, opContinuation, []byte(big[70000:140000]))
	c.writeFrame(true, opContinuation, []byte(big[140000:]))
	sent = append(sent, big)
	for i, want := range sent {
		select {
		case got := <-up:
			if string(got) != want {
				t.Fatalf("up message %d: got %.40q, want %.40q", i, got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("up message %d never arrived", i)
		}
	}
	f, err := c.readFrame(5 * time.Second)
	if err != nil || f.op != opPong || string(f.payload) != "between" {
		t.Errorf("ping not answered: %v %d %q", err, f.op, f.payload)
	}
	eventually(t, "up count", func() bool { return tp.metric(t, `wsproxy_messages_total{direction="up"}`) == 4 })
}

func TestUpControlErrorsKeepConnectionOpen(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "MAX_MESSAGE_SIZE_BYTES=1000")
	id, token := r.session(t)
	up := r.subscribeUp(t, id)
	c := tp.connect(t, id, token)
	expectUp := func(want string) {
		t.Helper()
		c.sendText(want)
		select {
		case got := <-up:
			if string(got) != want {
				t.Fatalf("got %s, want %s", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s never arrived", want)
		}
	}
	c.sendText(`{"unterminated":`)
	if code := c.controlError(); code != "invalid_json" {
		t.Errorf("got %s, want invalid_json", code)
	}
	c.writeFrame(true, opBinary, []byte(`{"a":1}`))
	if code := c.controlError(); code != "binary_not_supported" {
		t.Errorf("got %s, want binary_not_supported", code)
	}
	c.sendText(`"` + strings.Repeat("z", 1000) + `"`)
	if code := c.controlError(); code != "message_too_large" {
		t.Errorf("got %s, want message_too_large", code)
	}
	// Too large only across fragments: answered once, for the whole message.
	c.writeFrame(false, opText, []byte(`"`+strings.Repeat("z", 600)))
	c.writeFrame(false, opContinuation, []byte(strings.Repeat("z", 600)))
	c.writeFrame(true, opContinuation, []byte(strings.Repeat("z", 600)+`"`))
	if code := c.controlError(); code != "message_too_large" {
		t.Errorf("fragmented: got %s, want message_too_large", code)
	}
	expectUp(`{"still":"open"}`) // also proves the fragments were answered once
	fake.FailPublish("READONLY You can't write against a read only replica")
	c.sendText(`{"lost":true}`)
	if code := c.controlError(); code != "publish_failed" {
		t.Errorf("got %s, want publish_failed", code)
	}
	fake.FailPublish("")
	expectUp(`{"after":"failure"}`)
	for code, want := range map[string]float64{"invalid_json": 1, "binary_not_supported": 1, "message_too_large": 2, "publish_failed": 1} {
		if got := tp.metric(t, `wsproxy_client_errors_total{code="`+code+`"}`); got != want {
			t.Errorf("client_errors_total{%s} = %v, want %v", code, got, want)
		}
	}
}

func TestUpstreamDisabled(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "UPSTREAM_ENABLED=false")
	id, token := r.session(t)
	up := r.subscribeUp(t, id)
	c := tp.connect(t, id, token)
	c.sendText(`{"a":1}`)
	if code := c.controlError(); code != "upstream_disabled" {
		t.Errorf("got %s", code)
	}
	r.publish(t, id, `"down still works"`)
	if got := c.readText(); got != `"down still works"` {
		t.Errorf("got %s", got)
	}
	select {
	case m := <-up:
		t.Errorf("published upstream anyway: %s", m)
	default:
	}
}

func TestProtocolErrorsClose1002(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	c.writeFrame(true, opContinuation, []byte("no message to continue"))
	if code, _ := c.expectClose(5 * time.Second); code != 1002 {
		t.Errorf("close code %d, want 1002", code)
	}
}

func TestClientCloseIsEchoed(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	c.writeFrame(true, opClose, binary.BigEndian.AppendUint16(nil, 4000))
	if code, _ := c.expectClose(5 * time.Second); code != 4000 {
		t.Errorf("echoed code %d, want 4000", code)
	}
	eventually(t, "connection gone", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	// A code that may not appear on the wire is answered with 1002.
	c = tp.connect(t, id, token)
	c.writeFrame(true, opClose, binary.BigEndian.AppendUint16(nil, 1005))
	if code, _ := c.expectClose(5 * time.Second); code != 1002 {
		t.Errorf("answer to close 1005: %d, want 1002", code)
	}
}

// ---------------------------------------------------------------------------
// SPEC §4: liveness, backpressure, timeouts

func TestLivenessClosesSilentClient(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "WS_PING_INTERVAL_SECS=0.2", "WS_PING_TIMEOUT_SECS=0.2")
	id, token := r.session(t)
	silent, answering := tp.connect(t, id, token), tp.connect(t, id, token)
	silent.autoPong = false
	// The answering client, which never sends data, stays open for many
	// intervals; it reads (and so answers pings) beside the silent one.
	answered := make(chan error, 1)
	go func() {
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
	// The silent client reads (so it sees the pings) but never answers.
	code, _ := silent.expectClose(5 * time.Second)
	if code != 1006 {
		t.Errorf("silent client: close %d, want the connection dropped (1006)", code)
	}
	if silent.pings == 0 {
		t.Errorf("no pings were sent")
	}
	if elapsed := time.Since(start); elapsed < 300*time.Millisecond {
		t.Errorf("closed after %v, before interval+timeout", elapsed)
	}
	if err := <-answered; err != nil {
		t.Fatal(err)
	}
	if answering.pings < 5 {
		t.Errorf("answering client saw %d pings", answering.pings)
	}
	r.publish(t, id, `"alive"`)
	if got := answering.readText(); got != `"alive"` {
		t.Errorf("got %s", got)
	}
}

func TestSlowClientClosed1008WithoutSlowingOthers(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=65536")
	id, token := r.session(t)
	slow, fast := tp.connect(t, id, token), tp.connect(t, id, token)
	// The slow client never reads, so the kernel buffers fill, then its
	// queue. The fast one must get every message promptly meanwhile.
	message := `"` + strings.Repeat("m", 4094) + `"`
	for i := 0; tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`) == 0; i++ {
		if i == 20000 {
			t.Fatal("80 MB published and the slow client is still open")
		}
		r.publish(t, id, message)
		if got := fast.readText(); got != message {
			t.Fatalf("fast client got %.20q", got)
		}
	}
	code, reason := slow.expectClose(10 * time.Second)
	if code != 1008 || reason != "client too slow" {
		t.Errorf("slow client: %d %q, want 1008 client too slow", code, reason)
	}
	r.publish(t, id, `"after"`)
	if got := fast.readText(); got != `"after"` {
		t.Errorf("fast client got %s", got)
	}
	if !strings.Contains(tp.logs.String(), "client is falling behind") {
		t.Errorf("no 80%% warning in the logs")
	}
}

func TestIdleTimeout(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "IDLE_TIMEOUT_SECS=0.5")
	id, token := r.session(t)
	up := r.subscribeUp(t, id)
	c := tp.connect(t, id, token)
	start := time.Now()
	// Data either way keeps it open past the timeout.
	for i := 0; i < 4; i++ {
		time.Sleep(200 * time.Millisecond)
		if i%2 == 0 {
			c.sendText(`{"keep":"alive"}`)
			<-up
		} else {
			r.publish(t, id, `"tick"`)
			c.readText()
		}
	}
	code, _ := c.expectClose(5 * time.Second)
	if code != 1000 {
		t.Errorf("close %d, want 1000", code)
	}
	if elapsed := time.Since(start); elapsed < 1100*time.Millisecond {
		t.Errorf("closed after %v despite traffic", elapsed)
	}
}

func TestStreamEndTimeout(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r, "STREAM_END_TIMEOUT_SECS=0.4")
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	end := `{"type":"control","command":"stream_end","reason":"done"}`
	r.publish(t, id, end)
	if got := c.readText(); got != end {
		t.Fatalf("stream_end not forwarded as is: %s", got)
	}
	// A data message cancels the timer: a new stream began.
	time.Sleep(200 * time.Millisecond)
	r.publish(t, id, `"new stream"`)
	c.readText()
	time.Sleep(400 * time.Millisecond)
	r.publish(t, id, `"still open"`)
	if got := c.readText(); got != `"still open"` {
		t.Fatalf("got %s", got)
	}
	start := time.Now()
	r.publish(t, id, end)
	c.readText()
	if code, _ := c.expectClose(5 * time.Second); code != 1000 {
		t.Errorf("close %d, want 1000", code)
	}
	if elapsed := time.Since(start); elapsed < 350*time.Millisecond {
		t.Errorf("closed %v after stream_end", elapsed)
	}
}

// ---------------------------------------------------------------------------
// No leaks: connections, subscriptions and goroutines return to baseline.

func TestNoLeaks(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=20000")
	eventually(t, "proxy idle", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	http.DefaultClient.CloseIdleConnections()
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
		switch i % 4 { // leave in every way there is
		case 0:
			c.writeFrame(true, opClose, []byte{3, 232})
		case 1:
			c.conn.Close()
		case 2:
			c.sendText(`{"up":1}`)
			c.conn.Close()
		}
	}
	// The remaining quarter become slow clients and are closed by the proxy.
	big := `"` + strings.Repeat("b", 20000) + `"`
	for _, id := range ids {
		r.publish(t, id, big)
	}
	for i, c := range clients {
		if i%4 == 3 {
			c.conn.Close()
		}
	}
	eventually(t, "no connections", func() bool { return tp.metric(t, "wsproxy_active_connections") == 0 })
	eventually(t, "no subscriptions", func() bool { return len(sessionChannels(fake)) == 0 })
	if got := tp.metric(t, "wsproxy_subscribed_channels"); got != 0 {
		t.Errorf("subscribed_channels %v", got)
	}
	// Goroutines: none left serving a WebSocket, and none at all beyond
	// the two the fake runs for each Redis connection the pool has added.
	http.DefaultClient.CloseIdleConnections()
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

// goroutinesIn counts goroutines whose stack mentions any of the functions.
func goroutinesIn(functions ...string) int {
	buf := make([]byte, 8<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		for _, f := range functions {
			if strings.Contains(g, f) {
				n++
				break
			}
		}
	}
	return n
}

// ---------------------------------------------------------------------------
// SPEC §6: configuration, logs, metrics

func TestConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	want := config{Host: "0.0.0.0", Port: 8080, RedisURL: "redis://127.0.0.1:6379",
		PingInterval: 30 * time.Second, PingTimeout: 10 * time.Second, ShutdownGrace: 30 * time.Second,
		AuthMode: "redis", AuthTimeout: 5 * time.Second, AuthGrace: 10800 * time.Second,
		SubscribeTimeout: 5 * time.Second, MaxConnections: 50000, MaxMessageSize: 1048576, MaxBufferSize: 10485760,
		MaxTotalBuffer: 128 << 20, IdleTimeout: 0, StreamEndTimeout: 60 * time.Second, UpstreamEnabled: true, LogFormat: "json"}
	cfg.effective = nil // what the start-up log shows; TestStartupLogsConfigAndUnknownDotEnvKeys
	if fmt.Sprint(*cfg) != fmt.Sprint(want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", *cfg, want)
	}
}

func TestConfigRejectsMalformedValues(t *testing.T) {
	for _, tc := range [][2]string{
		{"PORT", "abc"}, {"PORT", "0"}, {"PORT", "65536"},
		{"REDIS_URL", "http://localhost:6379"}, {"REDIS_URL", "localhost:6379"},
		{"WS_PING_INTERVAL_SECS", "-1"}, {"WS_PING_INTERVAL_SECS", "0"}, {"WS_PING_TIMEOUT_SECS", "ten"},
		{"SHUTDOWN_GRACE_PERIOD_SECS", "-5"}, {"AUTH_TIMEOUT_SECS", "NaN"}, {"AUTH_GRACE_PERIOD_SECS", "-1"},
		{"SUBSCRIBE_TIMEOUT_SECS", "x"}, {"MAX_CONNECTIONS", "-3"}, {"MAX_MESSAGE_SIZE_BYTES", "1MB"},
		{"MAX_BUFFER_SIZE_BYTES", "0"}, {"MAX_TOTAL_BUFFER_BYTES", "1000"}, {"MAX_TOTAL_BUFFER_BYTES", "-1"}, {"IDLE_TIMEOUT_SECS", "-1"}, {"STREAM_END_TIMEOUT_SECS", "1h"},
		{"UPSTREAM_ENABLED", "maybe"}, {"AUTH_MODE", "ldap"}, {"LOG_LEVEL", "loud"}, {"LOG_FORMAT", "xml"},
	} {
		_, err := loadConfig(func(k string) string {
			if k == tc[0] {
				return tc[1]
			}
			return ""
		})
		if err == nil || !strings.HasPrefix(err.Error(), tc[0]+":") {
			t.Errorf("%s=%s: error %v, want one naming %s", tc[0], tc[1], err, tc[0])
		}
	}
	_, err := loadConfig(func(k string) string { return map[string]string{"AUTH_MODE": "jwt", "JWT_SECRET": "short"}[k] })
	if err == nil || !strings.HasPrefix(err.Error(), "JWT_SECRET:") || strings.Contains(err.Error(), "short") {
		t.Errorf("short JWT secret: %v", err)
	}
}

func TestDotEnvThenEnvironment(t *testing.T) {
	path := t.TempDir() + "/.env"
	os.WriteFile(path, []byte("\ufeff# comment\nPORT=9000\nexport LOG_FORMAT=\"text\"\nHOST='127.0.0.2'\n\nAUTH_MODE=none\nALLOWED_ORIGINS=https://a.example # not a comment\n"), 0o600)
	t.Setenv("AUTH_MODE", "redis")
	dotenv, err := readDotEnv(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(environment(dotenv))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Port != 9000 || cfg.LogFormat != "text" || cfg.Host != "127.0.0.2" || cfg.AuthMode != "redis" ||
		!slices.Equal(cfg.AllowedOrigins, []string{"https://a.example # not a comment"}) {
		t.Errorf("got %+v", cfg)
	}
	os.WriteFile(path, []byte("PORT 9000\n"), 0o600)
	if _, err := readDotEnv(path); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("malformed .env: %v", err)
	}
}

// A .env key that wsproxy does not read (a typo) is named in one warning at
// start-up, and the configuration is logged as a JSON object of the
// variables, secrets redacted.
func TestStartupLogsConfigAndUnknownDotEnvKeys(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/.env", []byte("\ufeffPROT=9000\nport=9001\nLOG_LEVEL=info\nAUTH_MODE=jwt\nJWT_SECRET="+strings.Repeat("j", 32)+"\n"), 0o600)
	cmd := exec.Command(buildProxy(t))
	cmd.Dir = dir
	cmd.Env = []string{"HOST=127.0.0.1", "PORT=" + strconv.Itoa(resFreePort(t)), "REDIS_URL=redis://user:hunter2@127.0.0.1:1"}
	out := exNewOutput()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var start map[string]any
	warned := map[string]bool{}
	eventually(t, "start-up records", func() bool {
		for _, line := range strings.Split(out.String(), "\n") {
			var rec map[string]any
			json.Unmarshal([]byte(line), &rec)
			if rec["msg"] == "starting" {
				start = rec
			} else if v, ok := rec["variable"].(string); ok && rec["level"] == "WARN" {
				warned[v] = true
			}
		}
		return start != nil && len(warned) == 2
	})
	if !warned["PROT"] || !warned["port"] {
		t.Errorf("warnings for %v, want PROT and port", warned)
	}
	config, ok := start["config"].(map[string]any)
	if !ok || config["PORT"] == nil || config["AUTH_MODE"] != "jwt" || config["JWT_SECRET"] != "REDACTED" ||
		config["REDIS_URL"] != "redis://user:REDACTED@127.0.0.1:1" {
		t.Errorf("config logged as %v", start["config"])
	}
	if strings.Contains(out.String(), "hunter2") || strings.Contains(out.String(), strings.Repeat("j", 32)) {
		t.Error("a secret appears in the log")
	}
}

// The binary refuses a malformed value with exit status 2 and one line that
// names the variable.
func TestBadConfigExitsWithStatus2(t *testing.T) {
	bin := buildProxy(t)
	for _, env := range []string{"PORT=abc", "AUTH_MODE=jwt", "REDIS_URL=http://x"} {
		cmd := exec.Command(bin)
		cmd.Dir = t.TempDir() // no .env there
		cmd.Env = append(os.Environ(), env)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("%s: %v, want exit status 2", env, err)
		}
		name := strings.Split(env, "=")[0]
		if name == "AUTH_MODE" {
			name = "JWT_SECRET"
		}
		if lines := strings.Split(strings.TrimSpace(stderr.String()), "\n"); len(lines) != 1 || !strings.Contains(lines[0], name) {
			t.Errorf("%s: stderr %q, want one line naming %s", env, stderr.String(), name)
		}
	}
}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// buildProxy builds the static binary once per test run.
func buildProxy(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "wsproxy-bin")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = dir + "/wsproxy"
		cmd := exec.Command("go", "build", "-o", buildPath, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

func TestLogsAreStructuredAndCarryIDs(t *testing.T) {
	r := newTestRedis(t)
	secret := strings.Repeat("k", 40)
	tp := startProxy(t, r, "AUTH_MODE=jwt", "JWT_SECRET="+secret)
	token := makeJWT(secret, map[string]any{"alg": "HS256"}, map[string]any{"session_id": "logged"})
	c := tp.connect(t, "logged", token)
	c.writeFrame(true, opClose, []byte{3, 232})
	c.expectClose(5 * time.Second)
	tp.dial(t, "/agent-1/ws/logged", http.Header{"Authorization": {"Bearer forged-" + token}})
	eventually(t, "close logged", func() bool { return strings.Contains(tp.logs.String(), "connection closed") })
	seen := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(tp.logs.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("not a JSON record: %s", line)
		}
		seen[rec["msg"].(string)] = rec
	}
	for _, msg := range []string{"connection open", "connection closed", "handshake refused"} {
		rec := seen[msg]
		if rec == nil || rec["session_id"] != "logged" || rec["agent_id"] != "agent-1" {
			t.Errorf("%s: %v", msg, rec)
		}
	}
	if rec := seen["connection closed"]; rec["conn"] == nil || rec["reason"] == nil || rec["duration"] == nil || rec["messages_down"] == nil {
		t.Errorf("close record lacks fields: %v", rec)
	}
	if start := seen["starting"]; start == nil || start["config"] == nil {
		t.Errorf("no start-up record with the configuration")
	}
	if logs := tp.logs.String(); strings.Contains(logs, secret) || strings.Contains(logs, token[:20]) {
		t.Errorf("a secret or token appears in the logs")
	}
}

func TestMetricsExposeEverySeries(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	r.publish(t, id, `"x"`)
	c.readText()
	// The writer counts after its write returns, so possibly after the read.
	eventually(t, "delivery counted", func() bool { return tp.metric(t, "wsproxy_delivery_latency_seconds_count") == 1 })
	_, body := tp.get(t, "/metrics")
	for _, series := range []string{
		"wsproxy_active_connections 1", `wsproxy_connections_total{result="accepted"} 1`,
		`wsproxy_messages_total{direction="down"} 1`, `wsproxy_bytes_total{direction="down"} 3`,
		`wsproxy_messages_total{direction="up"} 0`, `wsproxy_client_errors_total{code="invalid_json"} 0`,
		`wsproxy_slow_client_closes_total{limit="connection"} 0`, `wsproxy_slow_client_closes_total{limit="total"} 0`, "wsproxy_queued_bytes 0", "wsproxy_redis_connected 1", "wsproxy_redis_reconnects_total 0",
		"wsproxy_subscribed_channels 1", `wsproxy_delivery_latency_seconds_bucket{le="+Inf"} 1`,
		"wsproxy_delivery_latency_seconds_count 1", "# TYPE wsproxy_delivery_latency_seconds histogram",
		"process_resident_memory_bytes ", "go_goroutines ", "process_cpu_seconds_total ",
	} {
		if !strings.Contains(body, "\n"+series) {
			t.Errorf("missing %q", series)
		}
	}
}

// ---------------------------------------------------------------------------
// Benchmarks of the hot paths (issue 5): go test -run '^$' -bench . -benchmem

// benchConns returns n connections of one session, open on real loopback
// sockets whose far ends are read and discarded.
func benchConns(b *testing.B, n int) (*proxy, []*conn) {
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
		c := &conn{p: p, channel: "session:bench:down", started: true}
		c.attach(server, nil)
		p.hub.channels[c.channel] = append(p.hub.channels[c.channel], c)
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

// A burst larger than the socket buffers makes the writer take large
// batches while the dispatcher keeps queueing: every message must still
// arrive intact and in order.
func TestDownBurstKeepsOrder(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)
	rc, err := redis.DialURL(r.url)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	const n = 8000
	pad := strings.Repeat("p", 1000)
	for i := 0; i < n; i++ {
		rc.Send("PUBLISH", "session:"+id+":down", fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, pad))
	}
	if err := rc.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if _, err := rc.Receive(); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		if got, want := c.readText(), fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, pad); got != want {
			t.Fatalf("message %d: got %.30q", i, got)
		}
	}
}

// sessionChannels is what the fake has subscribed, but the keepalive channel.
func sessionChannels(fake *fakeRedis) []string {
	return slices.DeleteFunc(fake.SubscribedChannels(), func(c string) bool { return c == keepaliveChannel })
}

// With no client connected the subscriber is still PINGed, and stays up.
func TestSubscriberStaysConnectedWhenIdle(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	eventually(t, "two health-check PINGs", func() bool { return fake.CommandCount("PING") >= 2 })
	if got := tp.metric(t, "wsproxy_redis_reconnects_total"); got != 0 || !tp.p.hub.connected() {
		t.Errorf("idle subscriber reconnected %v times", got)
	}
}

// ---------------------------------------------------------------------------
// Issue 3 (SPEC §5): Redis outages, graceful shutdown, several instances and
// the scratch container, proved by breaking things for real: the fake Redis
// drops, refuses and freezes connections; a real redis-server is killed and
// restarted; the built binary is signalled, run twice on one Redis, and run
// alone under chroot.

// ---------------------------------------------------------------------------
// Redis outages, against the fake (items 1 to 5)

// Item 1: a subscriber connection that stops answering without being closed
// (half-open) is noticed by the PING health check within a few seconds, and
// the proxy says so for as long as Redis stays silent.
func TestRedisHalfOpenSubscriberDetected(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	c := tp.connect(t, id, token)

	fake.Freeze(true)
	frozen := time.Now()
	eventually(t, "wsproxy_redis_connected 0", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	// redisPingPeriod is 2 s and redisReadTimeout 5 s.
	if took := time.Since(frozen); took > 8*time.Second {
		t.Errorf("half-open subscriber noticed after %v, want within a few seconds", took)
	}
	// Redis still accepts TCP connections but answers nothing (a hung or
	// SIGSTOPped server does the same), so a new subscriber connection is
	// no proof that Redis is back: the proxy must keep saying it is down.
	resFor(t, redisReadTimeout+time.Second, func() {
		if got := tp.metric(t, "wsproxy_redis_connected"); got != 0 {
			t.Fatalf("wsproxy_redis_connected %v while Redis answers nothing", got)
		}
		if status, body := resGetWithin(t, tp.addr, "/ready", 2*time.Second); status != 503 || !strings.Contains(body, "redis_unavailable") {
			t.Fatalf("/ready while Redis answers nothing: %d %s", status, body)
		}
		if status, body := resGetWithin(t, tp.addr, "/health", 2*time.Second); status != 503 {
			t.Fatalf("/health while Redis answers nothing: %d %s", status, body)
		}
	})

	fake.Freeze(false)
	eventually(t, "ready again", func() bool { status, _ := tp.get(t, "/ready"); return status == 200 })
	if code := c.controlError(); code != "redis_reconnected" {
		t.Errorf("after the freeze: %s, want redis_reconnected", code)
	}
}

// SPEC §1: /health answers 503 when Redis does not answer a PING within 1 s,
// so a probe with a short timeout sees 503, not a timeout, when Redis hangs.
func TestHealthAnswers503PromptlyWhenRedisHangs(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	if status, body := tp.get(t, "/health"); status != 200 {
		t.Fatalf("/health: %d %s", status, body)
	}
	// Health probes come seconds apart: the pooled connection the last
	// probe used has been idle for longer than a second by the next one.
	time.Sleep(1100 * time.Millisecond)
	fake.Freeze(true)
	start := time.Now()
	status, body := resGetWithin(t, tp.addr, "/health", 5*time.Second)
	if took := time.Since(start); status != 503 || took > 1500*time.Millisecond {
		t.Errorf("/health with Redis hung: %d %s after %v, want 503 within about 1 s", status, body, took.Round(time.Millisecond))
	}
	fake.Freeze(false)
}

// Item 2: the subscriber is dropped and Redis refuses connections for a
// while. WebSockets stay open, the proxy reports the outage everywhere, and
// after recovery every channel that still has connections is subscribed
// again, and only those.
func TestRedisOutageKeepsConnectionsOpenAndResubscribes(t *testing.T) {
	r, fake := fakeTarget(t)
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
	if status, body := tp.get(t, "/health"); status != 503 || !strings.Contains(body, `"redis":"disconnected"`) {
		t.Errorf("/health during the outage: %d %s", status, body)
	}
	if status, body := tp.get(t, "/ready"); status != 503 || !strings.Contains(body, `"status":"redis_unavailable"`) {
		t.Errorf("/ready during the outage: %d %s", status, body)
	}
	_, res := tp.dial(t, "/agent-1/ws/"+a, http.Header{"Authorization": {"Bearer " + tokenA}})
	if res.status != 503 || res.code != "redis_unavailable" {
		t.Errorf("handshake during the outage: %d %s, want 503 redis_unavailable", res.status, res.body)
	}
	a1.sendText(`{"lost":"in the outage"}`)
	if code := a1.controlError(); code != "publish_failed" {
		t.Errorf("upstream message during the outage: %s, want publish_failed", code)
	}
	leaver.writeFrame(true, opClose, []byte{3, 232}) // its channel must not come back
	leaver.expectClose(5 * time.Second)
	eventually(t, "3 connections left", func() bool { return tp.metric(t, "wsproxy_active_connections") == 3 })

	fake.RefuseConnections(false)
	eventually(t, "wsproxy_redis_connected 1", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 1 })
	wantChannels := []string{"session:" + a + ":down", "session:" + b + ":down"}
	slices.Sort(wantChannels)
	want := strings.Join(wantChannels, " ")
	eventually(t, "resubscribed to "+want, func() bool { return strings.Join(sessionChannels(fake), " ") == want })
	if got := tp.metric(t, "wsproxy_redis_reconnects_total"); got < 1 {
		t.Errorf("wsproxy_redis_reconnects_total %v after a reconnect", got)
	}
	if got := tp.metric(t, "wsproxy_subscribed_channels"); got != 2 {
		t.Errorf("wsproxy_subscribed_channels %v, want 2", got)
	}
	if got := tp.metric(t, "wsproxy_active_connections"); got != 3 {
		t.Errorf("wsproxy_active_connections %v, want 3: the outage closed WebSockets", got)
	}
	if status, body := tp.get(t, "/ready"); status != 200 {
		t.Errorf("/ready after recovery: %d %s", status, body)
	}
	for _, c := range []*wsClient{a1, a2, b1} {
		if code := c.controlError(); code != "redis_reconnected" {
			t.Errorf("after recovery: %s, want redis_reconnected", code)
		}
	}
	up := r.subscribeUp(t, a)
	a1.sendText(`{"after":"recovery"}`)
	select {
	case got := <-up:
		if string(got) != `{"after":"recovery"}` {
			t.Errorf("up after recovery: got %s", got)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("the upstream message after recovery never arrived")
	}
	r.publish(t, a, `"after"`)
	if got := a1.readText(); got != `"after"` {
		t.Errorf("down after recovery: got %s", got)
	}
}

// Item 3: after resubscribing, each open connection is told that messages
// may have been lost (redis_reconnected) before it receives anything
// published afterwards.
func TestRedisReconnectedNoticeComesBeforeNewMessages(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	other, otherToken := r.session(t)
	clients := []*wsClient{tp.connect(t, id, token), tp.connect(t, id, token), tp.connect(t, other, otherToken)}

	fake.RefuseConnections(true)
	fake.DropConnections()
	eventually(t, "subscriber lost", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	if n := fake.Publish("session:"+id+":down", []byte(`"lost"`)); n != 0 {
		t.Fatalf("published during the outage to %d subscribers", n)
	}
	fake.RefuseConnections(false)
	fake.WaitSubscribers(t, "session:"+id+":down", 1)
	fake.WaitSubscribers(t, "session:"+other+":down", 1)
	for i := 0; i < 3; i++ {
		r.publish(t, id, fmt.Sprintf(`{"seq":%d}`, i))
		r.publish(t, other, fmt.Sprintf(`{"seq":%d}`, i))
	}
	for n, c := range clients {
		if code := c.controlError(); code != "redis_reconnected" {
			t.Fatalf("client %d: first frame after recovery is %s, want redis_reconnected", n, code)
		}
		for i := 0; i < 3; i++ {
			if got, want := c.readText(), fmt.Sprintf(`{"seq":%d}`, i); got != want {
				t.Fatalf("client %d: got %s, want %s", n, got, want)
			}
		}
	}
	if got := tp.metric(t, `wsproxy_client_errors_total{code="redis_reconnected"}`); got != 3 {
		t.Errorf(`wsproxy_client_errors_total{code="redis_reconnected"} %v, want 3`, got)
	}
}

// Item 4: the service starts while Redis is down, reports it, and becomes
// ready when Redis comes up. Run as a process: starting is the point.
func TestServiceStartsWhileRedisDownAndBecomesReady(t *testing.T) {
	r, fake := fakeTarget(t)
	id, token := r.session(t)
	fake.RefuseConnections(true)
	p := resStartBinary(t, r.url)
	eventually(t, "listening", func() bool { status, _ := resGet(p.addr, "/ready"); return status != 0 })
	// Redis accepts TCP connections and closes them at once, as a Redis at
	// maxclients or a TCP proxy with no Redis behind it does: not ready.
	resFor(t, 3*time.Second, func() {
		if status, body := resGetWithin(t, p.addr, "/ready", 2*time.Second); status != 503 || !strings.Contains(body, "redis_unavailable") {
			t.Fatalf("/ready with Redis down: %d %s", status, body)
		}
	})
	if status, body := resGetWithin(t, p.addr, "/health", 2*time.Second); status != 503 {
		t.Errorf("/health with Redis down: %d %s", status, body)
	}
	if got := resMetric(t, p.addr, "wsproxy_redis_reconnects_total"); got != 0 {
		t.Errorf("wsproxy_redis_reconnects_total %v while Redis refused every connection: the subscriber was declared connected before Redis answered", got)
	}
	_, res := dialWS(t, p.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
	if res.status != 503 || res.code != "redis_unavailable" {
		t.Errorf("handshake with Redis down: %d %s", res.status, res.body)
	}
	if p.hasExited() {
		t.Fatalf("the proxy exited with Redis down: %v", p.err)
	}

	fake.RefuseConnections(false)
	p.waitReady(t)
	if status, body := resGetWithin(t, p.addr, "/health", 2*time.Second); status != 200 {
		t.Errorf("/health once Redis is up: %d %s", status, body)
	}
	c, res := dialWS(t, p.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
	if c == nil {
		t.Fatalf("handshake once Redis is up: %d %s", res.status, res.body)
	}
	r.publish(t, id, `"hello"`)
	if got := c.readText(); got != `"hello"` {
		t.Errorf("got %s", got)
	}
	if got := resMetric(t, p.addr, "wsproxy_redis_reconnects_total"); got != 0 {
		t.Errorf("the first connection was counted as %v reconnects", got)
	}
}

// Item 5: a handshake waiting for its SUBSCRIBE confirmation when the
// subscriber connection breaks is answered 503 at once, not after
// SUBSCRIBE_TIMEOUT_SECS, and leaves no connection, waiter or subscription.
func TestHandshakeWaitingForSubscriptionFailsWhenRedisBreaks(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "SUBSCRIBE_TIMEOUT_SECS=10")
	id, token := r.session(t)
	channel := "session:" + id + ":down"
	fake.HoldSubscribes(true)
	answered := make(chan handshakeResult, 1)
	go func() {
		_, res, err := tryDial(tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
		if err != nil {
			res.body = err.Error()
		}
		answered <- res
	}()
	fake.WaitSubscribers(t, channel, 1) // its SUBSCRIBE is in; the confirmation is held

	fake.DropConnections()
	broke := time.Now()
	select {
	case res := <-answered:
		if took := time.Since(broke); res.status != 503 || res.code != "redis_unavailable" || took > 5*time.Second {
			t.Errorf("handshake: %d %s after %v, want 503 redis_unavailable well before SUBSCRIBE_TIMEOUT_SECS", res.status, res.body, took)
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
	if got := sessionChannels(fake); len(got) != 0 {
		t.Errorf("subscribed after recovery: %v", got)
	}
	if got := tp.metric(t, "wsproxy_subscribed_channels"); got != 0 {
		t.Errorf("wsproxy_subscribed_channels %v, want 0", got)
	}
	if got := tp.metric(t, "wsproxy_active_connections"); got != 0 {
		t.Errorf("wsproxy_active_connections %v, want 0", got)
	}
}

// After a short outage Redis is back and /ready says so: the very next
// handshake and upstream message succeed, rather than failing on pooled
// connections that died with the old Redis connections.
func TestFirstRequestsAfterRecoverySucceed(t *testing.T) {
	r, fake := fakeTarget(t)
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
		if status, body := tp.get(t, "/ready"); status != 200 {
			t.Fatalf("/ready after recovery: %d %s", status, body)
		}
		if code := c.controlError(); code != "redis_reconnected" {
			t.Fatalf("got %s, want redis_reconnected", code)
		}
	}

	blip()
	if d, res := tp.dial(t, "/agent-1/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}); d == nil {
		t.Errorf("first handshake after recovery: %d %s, want 101", res.status, strings.TrimSpace(res.body))
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

// ---------------------------------------------------------------------------
// A real redis-server, killed and restarted

func TestRealRedisRestartKeepsConnectionsOpen(t *testing.T) {
	server := resStartRedisServer(t)
	r := &testRedis{url: server.url()}
	tp := startProxy(t, r)
	a, tokenA := r.session(t)
	b, tokenB := r.session(t)
	clients := []*wsClient{tp.connect(t, a, tokenA), tp.connect(t, a, tokenA), tp.connect(t, b, tokenB)}
	if n := r.publish(t, a, `"before"`); n != 1 {
		t.Fatalf("PUBLISH reached %d subscribers, want the proxy's 1", n)
	}
	clients[0].readText()
	clients[1].readText()

	server.kill()
	eventually(t, "wsproxy_redis_connected 0", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 0 })
	_, res := tp.dial(t, "/agent-1/ws/"+a, http.Header{"Authorization": {"Bearer " + tokenA}})
	if res.status != 503 || res.code != "redis_unavailable" {
		t.Errorf("handshake with Redis killed: %d %s", res.status, res.body)
	}
	if status, _ := tp.get(t, "/ready"); status != 503 {
		t.Errorf("/ready with Redis killed: %d", status)
	}
	clients[2].sendText(`{"lost":true}`)
	if code := clients[2].controlError(); code != "publish_failed" {
		t.Errorf("upstream with Redis killed: %s, want publish_failed", code)
	}

	server.start() // empty: the tokens are gone, the open connections are not
	eventually(t, "wsproxy_redis_connected 1", func() bool { return tp.metric(t, "wsproxy_redis_connected") == 1 })
	r.waitNumSub(t, "session:"+a+":down", 1)
	r.waitNumSub(t, "session:"+b+":down", 1)
	r.publish(t, a, `"after a"`)
	r.publish(t, b, `"after b"`)
	for i, c := range clients {
		if code := c.controlError(); code != "redis_reconnected" {
			t.Errorf("client %d: %s, want redis_reconnected", i, code)
		}
		want := `"after a"`
		if i == 2 {
			want = `"after b"`
		}
		if got := c.readText(); got != want {
			t.Errorf("client %d: got %s, want %s", i, got, want)
		}
	}
	if got := tp.metric(t, "wsproxy_redis_reconnects_total"); got < 1 {
		t.Errorf("wsproxy_redis_reconnects_total %v", got)
	}
	id, token := r.session(t)
	tp.connect(t, id, token) // new handshakes work again
}

// ---------------------------------------------------------------------------
// Shutdown, as a process (item 6)

// After SIGTERM the proxy stops taking connections but serves the open ones,
// and exits as soon as the last one closes, long before the deadline.
func TestShutdownDrainsUntilLastConnectionCloses(t *testing.T) {
	r, _ := fakeTarget(t)
	p := resStartBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=20")
	p.waitReady(t)
	id, token := r.session(t)
	auth := http.Header{"Authorization": {"Bearer " + token}}
	first, _ := dialWS(t, p.addr, "/agent/ws/"+id, auth, true)
	second, _ := dialWS(t, p.addr, "/agent/ws/"+id, auth, true)
	if first == nil || second == nil {
		t.Fatal("handshake refused before shutdown")
	}
	eventually(t, "2 active connections", func() bool { return resMetric(t, p.addr, "wsproxy_active_connections") == 2 })

	signalled := p.signal(t, syscall.SIGTERM)
	eventually(t, "/ready draining", func() bool {
		status, body := resGet(p.addr, "/ready")
		return status == 503 && strings.Contains(body, `"status":"draining"`)
	})
	if took := time.Since(signalled); took > time.Second {
		t.Errorf("/ready said draining %v after SIGTERM, want at once", took)
	}
	draining := p.waitLog(t, `"draining" record`, func(rec map[string]any) bool { return rec["msg"] == "draining" })
	if draining["connections"] != 2.0 {
		t.Errorf("draining log: connections %v, want 2", draining["connections"])
	}
	if deadline, err := time.Parse(time.RFC3339Nano, fmt.Sprint(draining["deadline"])); err != nil ||
		deadline.Sub(signalled.Add(20*time.Second)).Abs() > 2*time.Second {
		t.Errorf("draining log: deadline %v, want about 20 s after the signal", draining["deadline"])
	}
	if _, res := dialWS(t, p.addr, "/agent/ws/"+id, auth, true); res.status != 503 || res.code != "draining" {
		t.Errorf("handshake while draining: %d %s, want 503 draining", res.status, res.body)
	}
	r.publish(t, id, `"during the grace period"`)
	for _, c := range []*wsClient{first, second} {
		if got := c.readText(); got != `"during the grace period"` {
			t.Errorf("got %s", got)
		}
	}

	resCloseNormally(t, first)
	r.publish(t, id, `"still serving"`) // one connection left: not exited yet
	if got := second.readText(); got != `"still serving"` {
		t.Errorf("got %s", got)
	}
	closed := time.Now()
	resCloseNormally(t, second)
	if err := p.waitExit(5 * time.Second); err != nil {
		t.Fatalf("exit: %v, want status 0", err)
	}
	if took := time.Since(closed); took > 3*time.Second {
		t.Errorf("exited %v after the last connection closed, want at once", took)
	}
}

// At the deadline every remaining connection first receives what is queued
// for it, then close 1001. A client that has read nothing has megabytes
// queued in the proxy by then, more than the socket buffers hold.
func TestShutdownDeadlineFlushesQueuesThenCloses1001(t *testing.T) {
	r, fake := fakeTarget(t)
	const grace = time.Second
	p := resStartBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=1", "MAX_BUFFER_SIZE_BYTES=67108864")
	p.waitReady(t)
	id, token := r.session(t)
	auth := http.Header{"Authorization": {"Bearer " + token}}
	stalled, _ := dialWS(t, p.addr, "/agent/ws/"+id, auth, true)
	reader, _ := dialWS(t, p.addr, "/agent/ws/"+id, auth, true)
	if stalled == nil || reader == nil {
		t.Fatal("handshake refused")
	}
	const count = 160 // of 64 KiB: 10 MiB
	payload := strings.Repeat("q", 64<<10)
	message := func(i int) string { return fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, payload) }
	for i := 0; i < count; i++ {
		fake.Publish("session:"+id+":down", []byte(message(i)))
	}
	// Once the reader has everything, the proxy has queued it all for the
	// stalled client as well: the hub queues each message for both at once.
	for i := 0; i < count; i++ {
		if got := reader.readText(); got != message(i) {
			t.Fatalf("reader: message %d is %.20s", i, got)
		}
	}

	signalled := p.signal(t, syscall.SIGTERM)
	p.waitLog(t, "grace period over", func(rec map[string]any) bool { return strings.HasPrefix(fmt.Sprint(rec["msg"]), "grace period over") })
	if took := time.Since(signalled); took < grace-100*time.Millisecond {
		t.Errorf("connections closed %v after SIGTERM, before the %v grace period", took, grace)
	}
	for i := 0; i < count; i++ {
		f, err := stalled.next(10 * time.Second)
		if err != nil || f.op != opText || string(f.payload) != message(i) {
			t.Fatalf("stalled client: message %d: opcode %d %.30q %v, want the queue flushed before the close", i, f.op, f.payload, err)
		}
	}
	for name, c := range map[string]*wsClient{"stalled": stalled, "reader": reader} {
		if code, reason := c.expectClose(5 * time.Second); code != 1001 {
			t.Errorf("%s client: close %d %q, want 1001", name, code, reason)
		}
		c.conn.Close()
	}
	if err := p.waitExit(10 * time.Second); err != nil {
		t.Errorf("exit: %v, want status 0", err)
	}
}

// A second signal skips the wait: every connection is closed with 1001 at
// once, and the exit status is still 0.
func TestShutdownSecondSignalClosesAtOnce(t *testing.T) {
	r, _ := fakeTarget(t)
	p := resStartBinary(t, r.url, "SHUTDOWN_GRACE_PERIOD_SECS=30")
	p.waitReady(t)
	id, token := r.session(t)
	auth := http.Header{"Authorization": {"Bearer " + token}}
	var clients []*wsClient
	for i := 0; i < 3; i++ {
		c, res := dialWS(t, p.addr, "/agent/ws/"+id, auth, true)
		if c == nil {
			t.Fatalf("handshake: %d %s", res.status, res.body)
		}
		clients = append(clients, c)
	}
	p.signal(t, syscall.SIGTERM)
	p.waitLog(t, `"draining" record`, func(rec map[string]any) bool { return rec["msg"] == "draining" })
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
	if err := p.waitExit(5 * time.Second); err != nil {
		t.Errorf("exit: %v, want status 0", err)
	}
	p.waitLog(t, "second signal record", func(rec map[string]any) bool { return strings.HasPrefix(fmt.Sprint(rec["msg"]), "second signal") })
}

// ---------------------------------------------------------------------------
// Several instances (item 7)

// Two processes on one Redis: both connections of a session receive every
// message; when one instance stops, its client reconnects to the other with
// the same token and carries on.
func TestTwoInstancesShareOneRedis(t *testing.T) {
	r := resSharedRedis(t)
	env := []string{"AUTH_GRACE_PERIOD_SECS=60", "SHUTDOWN_GRACE_PERIOD_SECS=1"}
	stopping, staying := resStartBinary(t, r.url, env...), resStartBinary(t, r.url, env...)
	stopping.waitReady(t)
	staying.waitReady(t)
	id, token := r.session(t)
	auth := http.Header{"Authorization": {"Bearer " + token}}
	moving, _ := dialWS(t, stopping.addr, "/agent/ws/"+id, auth, true)
	fixed, _ := dialWS(t, staying.addr, "/agent/ws/"+id, auth, true)
	if moving == nil || fixed == nil {
		t.Fatal("handshake refused")
	}
	if n := r.publish(t, id, `{"seq":0}`); n != 2 {
		t.Fatalf("PUBLISH reached %d subscribers, want one per instance", n)
	}
	for i := 1; i < 20; i++ {
		r.publish(t, id, fmt.Sprintf(`{"seq":%d}`, i))
	}
	for _, c := range []*wsClient{moving, fixed} {
		for i := 0; i < 20; i++ {
			if got, want := c.readText(), fmt.Sprintf(`{"seq":%d}`, i); got != want {
				t.Fatalf("got %s, want %s", got, want)
			}
		}
	}

	stopping.signal(t, syscall.SIGTERM)
	if code, _ := moving.expectClose(5 * time.Second); code != 1001 {
		t.Errorf("client of the stopped instance: close %d, want 1001", code)
	}
	moving.conn.Close()
	if err := stopping.waitExit(5 * time.Second); err != nil {
		t.Errorf("stopped instance: %v, want status 0", err)
	}
	moved, res := dialWS(t, staying.addr, "/agent/ws/"+id, auth, true)
	if moved == nil {
		t.Fatalf("reconnect to the other instance with the same token: %d %s", res.status, res.body)
	}
	if n := r.publish(t, id, `"after the move"`); n != 1 {
		t.Errorf("PUBLISH reached %d subscribers, want the remaining instance's 1", n)
	}
	for _, c := range []*wsClient{moved, fixed} {
		if got := c.readText(); got != `"after the move"` {
			t.Errorf("got %s", got)
		}
	}
}

// ---------------------------------------------------------------------------
// Scratch container (item 8)

// The CGO_ENABLED=0 binary is static and runs alone in an empty root: no
// /etc, no CA bundle, no libc.
func TestStaticBinaryRunsInEmptyRoot(t *testing.T) {
	bin := buildProxy(t)
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
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
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "wsproxy"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	r, _ := fakeTarget(t)
	p := resStart(t, chroot, []string{root, "/wsproxy"}, "REDIS_URL="+r.url)
	p.waitReady(t)
	if status, body := resGetWithin(t, p.addr, "/health", 2*time.Second); status != 200 {
		t.Errorf("/health of the chrooted binary: %d %s", status, body)
	}
	if entries, _ := os.ReadDir(root); len(entries) != 1 {
		t.Errorf("the root holds %d entries, want the binary alone", len(entries))
	}
}

// ---------------------------------------------------------------------------
// Helpers

// resFor runs check repeatedly for d: the one way to assert that a state
// holds for a while, which no signal can announce.
func resFor(t testing.TB, d time.Duration, check func()) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		check()
	}
}

// resMetric reads one series from a proxy process's /metrics.
func resMetric(t testing.TB, addr, series string) float64 {
	t.Helper()
	_, body := resGetWithin(t, addr, "/metrics", 5*time.Second)
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(rest, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", series, err)
			}
			return v
		}
	}
	t.Fatalf("metric %s not found in:\n%s", series, body)
	return 0
}

// resGet answers 0 when the server cannot be reached or does not answer
// within 5 s. It may be called from any goroutine.
func resGet(addr, path string) (int, string) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// resGetWithin fails the test unless addr answers path within limit.
func resGetWithin(t testing.TB, addr, path string, limit time.Duration) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: limit, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("GET %s: no answer after %v: %v", path, time.Since(start).Round(time.Millisecond), err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// resCloseNormally sends close 1000 and waits for the echo.
func resCloseNormally(t testing.TB, c *wsClient) {
	t.Helper()
	c.writeFrame(true, opClose, binary.BigEndian.AppendUint16(nil, 1000))
	if code, _ := c.expectClose(5 * time.Second); code != 1000 {
		t.Errorf("close echoed with %d, want 1000", code)
	}
	c.conn.Close()
}

// resFreePort returns a loopback port that was free a moment ago.
func resFreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// resProcess is a proxy binary running on 127.0.0.1:PORT.
type resProcess struct {
	addr   string
	cmd    *exec.Cmd
	out    *exOutput
	exited chan struct{} // closed when it has exited
	err    error         // its exit status, once exited is closed
}

// resStartBinary runs the built proxy against redisURL with env overriding
// the defaults below; it is killed at the end of the test.
func resStartBinary(t testing.TB, redisURL string, env ...string) *resProcess {
	t.Helper()
	return resStart(t, buildProxy(t), nil, append([]string{"REDIS_URL=" + redisURL}, env...)...)
}

// resStart runs name with args and the proxy's environment: no inherited
// variables, a free port on loopback, JSON logs on stdout, which it collects.
func resStart(t testing.TB, name string, args []string, env ...string) *resProcess {
	t.Helper()
	port := resFreePort(t)
	cmd := exec.Command(name, args...)
	cmd.Dir = t.TempDir() // no stray .env
	cmd.Env = append([]string{"HOST=127.0.0.1", "PORT=" + strconv.Itoa(port), "LOG_FORMAT=json", "LOG_LEVEL=debug"}, env...)
	p := &resProcess{addr: "127.0.0.1:" + strconv.Itoa(port), cmd: cmd, out: exNewOutput(), exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { // ends when the process does; the cleanup waits for it
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) still runs after SIGKILL", name, cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("%s %v output:\n%s", name, args, p.out)
		}
	})
	return p
}

// waitReady polls /ready until it answers 200: the proxy announces
// readiness in no other way.
func (p *resProcess) waitReady(t testing.TB) {
	t.Helper()
	eventually(t, "proxy process ready", func() bool {
		if p.hasExited() {
			t.Fatalf("the proxy exited (%v):\n%s", p.err, p.out)
		}
		status, _ := resGet(p.addr, "/ready")
		return status == 200
	})
}

func (p *resProcess) signal(t testing.TB, sig syscall.Signal) time.Time {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
	return time.Now()
}

func (p *resProcess) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// waitExit returns the exit status as an error (nil for 0), or an error if
// the process still runs after limit.
func (p *resProcess) waitExit(limit time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(limit):
		return fmt.Errorf("still running after %v", limit)
	}
}

// waitLog waits for a JSON log record that match accepts, and returns it.
func (p *resProcess) waitLog(t testing.TB, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		text, changed := p.out.snapshot()
		for _, line := range strings.Split(text, "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && match(rec) {
				return rec
			}
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("no %s in the proxy's log after 10 s:\n%s", what, text)
		}
	}
}

// resSharedRedis is the Redis two processes share: a redis-server of the
// test's own when one is installed, else the fake.
func resSharedRedis(t testing.TB) *testRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Log("redis-server is not installed: the instances share the fake Redis")
		r, _ := fakeTarget(t)
		return r
	}
	return &testRedis{url: resStartRedisServer(t).url()}
}

// resRedisServer is a redis-server of the test's own on a free port, which
// the test can kill and start again on the same port.
type resRedisServer struct {
	t      testing.TB
	path   string
	port   int
	cmd    *exec.Cmd
	exited chan struct{}
}

// resStartRedisServer starts a throwaway redis-server, or skips the test
// when none is installed. It is killed at the end of the test.
func resStartRedisServer(t testing.TB) *resRedisServer {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not on PATH (apt-get install redis-server): skipping the real-Redis test")
	}
	s := &resRedisServer{t: t, path: path, port: resFreePort(t)}
	s.start()
	t.Cleanup(s.kill)
	return s
}

func (s *resRedisServer) url() string { return "redis://127.0.0.1:" + strconv.Itoa(s.port) }

// start runs redis-server (without persistence: a restart comes back empty)
// and waits until it answers PING.
func (s *resRedisServer) start() {
	s.t.Helper()
	s.cmd = exec.Command(s.path, "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.t.TempDir())
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	output := exNewOutput()
	s.cmd.Stdout, s.cmd.Stderr = output, output
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("redis-server: %v", err)
	}
	exited := make(chan struct{})
	s.exited = exited
	go func(cmd *exec.Cmd) { cmd.Wait(); close(exited) }(s.cmd) // ends with the process
	eventually(s.t, "redis-server answering on port "+strconv.Itoa(s.port), func() bool {
		select {
		case <-exited:
			s.t.Fatalf("redis-server exited:\n%s", output)
		default:
		}
		c, err := redis.DialURL(s.url(), redis.DialConnectTimeout(time.Second), redis.DialReadTimeout(time.Second))
		if err != nil {
			return false
		}
		defer c.Close()
		_, err = c.Do("PING")
		return err == nil
	})
}

// kill stops redis-server with SIGKILL, as a crash would, and waits for it.
func (s *resRedisServer) kill() {
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.t.Errorf("redis-server (pid %d) still runs after SIGKILL", s.cmd.Process.Pid)
	}
	s.cmd = nil
}

// TestMain removes the binary that process-level tests build.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildPath != "" {
		os.RemoveAll(filepath.Dir(buildPath))
	}
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// The example programs, the browser client in a real headless Chromium,
// the FastAPI worker, and the walkthroughs of README.md and
// examples/README.md run exactly as written. They run real processes
// (the proxy binary, the example binaries, redis-server, chromium, uvicorn)
// and skip with a message naming what is missing.

// exWait bounds every single wait in these tests: a process starting, a
// line appearing, a message arriving.
const exWait = 20 * time.Second

// exProxyVariables are the proxy's configuration variables. They are removed
// from the environment of every process these tests start, so a developer's
// shell cannot change what is tested.
var exProxyVariables = []string{
	"HOST", "PORT", "REDIS_URL", "AUTH_MODE", "AUTH_TIMEOUT_SECS", "AUTH_GRACE_PERIOD_SECS", "JWT_SECRET",
	"WS_PING_INTERVAL_SECS", "WS_PING_TIMEOUT_SECS", "SHUTDOWN_GRACE_PERIOD_SECS", "SUBSCRIBE_TIMEOUT_SECS",
	"MAX_CONNECTIONS", "MAX_MESSAGE_SIZE_BYTES", "MAX_BUFFER_SIZE_BYTES", "MAX_TOTAL_BUFFER_BYTES", "IDLE_TIMEOUT_SECS",
	"STREAM_END_TIMEOUT_SECS", "UPSTREAM_ENABLED", "ALLOWED_ORIGINS", "LOG_LEVEL", "LOG_FORMAT",
	"WSPROXY_URL",
}

// ---------------------------------------------------------------------------
// The browser client

// TestBrowserClient opens examples/browser/index.html in headless Chromium
// against a real proxy and Redis: a message published to the down channel
// appears in the page, a message the page sends arrives on the up channel, a
// message that is not JSON shows the proxy's control error, and when the
// proxy restarts the page shows the close code and reconnects by itself.
func TestBrowserClient(t *testing.T) {
	chromium := exChromiumPath(t)
	redisURL := exRedisURL(t)
	bin := exBuild(t)
	port := resFreePort(t)
	proxyEnv := []string{"SHUTDOWN_GRACE_PERIOD_SECS=0.2"}
	proxy := exStartProxy(t, bin, redisURL, port, proxyEnv...)

	sessionID, token := exRandomID("browser"), exRandomID("token")
	exRedisDo(t, redisURL, "SET", "session:"+sessionID+":auth", token, "EX", 600)
	up := exSubscribe(t, redisURL, "session:"+sessionID+":up")

	pages := httptest.NewServer(http.FileServer(http.Dir("examples/browser")))
	t.Cleanup(pages.Close)
	query := url.Values{
		"url": {fmt.Sprintf("ws://127.0.0.1:%d", port)}, "agent": {"browser-agent"},
		"session": {sessionID}, "token": {token}, "autoconnect": {"1"},
	}
	page := exOpenPage(t, chromium, pages.URL+"/index.html?"+query.Encode())

	page.waitFor("the connection to open", `document.getElementById("status").dataset.state === "open"`)

	// Down: a published message appears byte for byte, and its payload in
	// the answer area.
	down := `{"type":"data","payload":"hello from Redis"}`
	if receivers := exPublish(t, redisURL, "session:"+sessionID+":down", down); receivers != 1 {
		t.Fatalf("PUBLISH reached %d subscribers, want 1 (the proxy)", receivers)
	}
	page.waitFor("the published message in #log",
		`[...document.querySelectorAll("#log .msg .body")].some(e => e.textContent === `+exJS(down)+`)`)
	if got := page.eval(`document.getElementById("stream").textContent`); got != "hello from Redis" {
		t.Errorf("#stream = %q, want the payload %q", got, "hello from Redis")
	}

	// Up: what the user sends arrives on the up channel unchanged.
	outgoing := `{"type":"chat","text":"hi from the browser"}`
	page.eval(`document.getElementById("outgoing").value = ` + exJS(outgoing) + `; document.getElementById("send").click(); true`)
	select {
	case got := <-up:
		if string(got) != outgoing {
			t.Fatalf("up channel received %q, want %q", got, outgoing)
		}
	case <-time.After(exWait):
		t.Fatalf("nothing arrived on the up channel; page: %s", page.state())
	}

	// A message that is not JSON is answered with a control error, shown in the page.
	page.eval(`document.getElementById("outgoing").value = "not json"; document.getElementById("send").click(); true`)
	page.waitFor("the invalid_json control error",
		`[...document.querySelectorAll("#log .control-error .body")].some(e => e.textContent.startsWith("invalid_json"))`)

	// The proxy restarts: the page shows 1001 (going away) and reconnects.
	if err := proxy.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := proxy.waitExit(exWait); err != nil {
		t.Fatalf("proxy did not stop cleanly on SIGTERM: %v", err)
	}
	page.waitFor("close code 1001", `document.getElementById("close-code").dataset.code === "1001"`)
	page.waitFor("the page to schedule a reconnection", `document.getElementById("status").dataset.state === "reconnecting"`)
	exStartProxy(t, bin, redisURL, port, proxyEnv...)
	page.waitFor("the page to reconnect", `document.getElementById("status").dataset.state === "open"`)
	again := `{"type":"data","payload":" and hello again"}`
	if receivers := exPublish(t, redisURL, "session:"+sessionID+":down", again); receivers != 1 {
		t.Fatalf("after the reconnection PUBLISH reached %d subscribers, want 1", receivers)
	}
	page.waitFor("the message published after the reconnection",
		`[...document.querySelectorAll("#log .msg .body")].some(e => e.textContent === `+exJS(again)+`)`)
}

// TestBrowserClientRefusals: the page says why the proxy refused it, in
// words, and acts on the close code. Refused for good (4401 unknown_session,
// 4403 invalid_token), it stops: the proxy sees that one handshake and no
// more, and #status shows the refused state, not retrying. Refused for now
// (4503 too_many_connections, with MAX_CONNECTIONS=1 and the one connection
// taken), it backs off and retries, keeps what the user sent, and connects
// once there is room.
func TestBrowserClientRefusals(t *testing.T) {
	chromium := exChromiumPath(t)
	redisURL := exRedisURL(t)
	bin := exBuild(t)
	port := resFreePort(t)
	proxy := exStartProxy(t, bin, redisURL, port, "MAX_CONNECTIONS=1")
	addr := fmt.Sprintf("127.0.0.1:%d", port)

	sessionID, token := exRandomID("refusals"), exRandomID("token")
	exRedisDo(t, redisURL, "SET", "session:"+sessionID+":auth", token, "EX", 600)
	up := exSubscribe(t, redisURL, "session:"+sessionID+":up")

	pages := httptest.NewServer(http.FileServer(http.Dir("examples/browser")))
	t.Cleanup(pages.Close)
	query := url.Values{"url": {"ws://" + addr}, "agent": {"browser-agent"}}
	page := exOpenPage(t, chromium, pages.URL+"/index.html?"+query.Encode())
	connect := func(session, token string) {
		page.eval(`document.getElementById("session").value = ` + exJS(session) +
			`; document.getElementById("token").value = ` + exJS(token) +
			`; document.getElementById("connect").click(); true`)
	}
	status := func() (state, retrying, text string) {
		value, _ := page.eval(`JSON.stringify([document.getElementById("status").dataset.state,
			document.getElementById("status").dataset.retrying, document.getElementById("status").textContent])`).(string)
		var fields []string
		json.Unmarshal([]byte(value), &fields)
		if len(fields) != 3 {
			t.Fatalf("#status reads %q", value)
		}
		return fields[0], fields[1], fields[2]
	}
	refusals := func() int { return strings.Count(proxy.output.String(), `msg="handshake refused"`) }

	for i, tc := range []struct {
		name, session, token, code, reason, result, words string
	}{
		{"unknown session", exRandomID("no-such-session"), token, "4401", "unknown_session", "unauthorized",
			"refused: unknown_session (4401) - get a new token"},
		{"wrong token", sessionID, "wrong-token", "4403", "invalid_token", "forbidden",
			"refused: invalid_token (4403) - get a new token"},
	} {
		connect(tc.session, tc.token)
		page.waitFor(tc.name+" refused", `document.getElementById("status").dataset.state === "refused"`)
		if got := page.eval(`document.getElementById("close-code").dataset.code + " " + document.getElementById("close-code").dataset.reason`); got != tc.code+" "+tc.reason {
			t.Errorf("%s: #close-code data = %q, want %q", tc.name, got, tc.code+" "+tc.reason)
		}
		if _, retrying, text := status(); text != tc.words || retrying != "false" {
			t.Errorf("%s: #status %q, data-retrying=%s; want %q, not retrying", tc.name, text, retrying, tc.words)
		}
		page.waitFor(tc.name+" in #log", `[...document.querySelectorAll("#log .close .body")].some(e => e.textContent === `+exJS(tc.words)+`)`)
		// It stays refused: the backoff would have retried within 0.6 s.
		series := `wsproxy_connections_total{result="` + tc.result + `"}`
		resFor(t, 2*time.Second, func() {
			if n := resMetric(t, addr, series); n != 1 {
				t.Fatalf("%s: %s = %v, want 1: the page retried a refusal for good; page: %s", tc.name, series, n, page.state())
			}
		})
		if state, retrying, _ := status(); state != "refused" || retrying != "false" {
			t.Fatalf("%s: after 2 s the page is %s (retrying %s), want still refused; page: %s", tc.name, state, retrying, page.state())
		}
		if n := refusals(); n != i+1 {
			t.Errorf("%s: the proxy logged %d refusals in all, want %d", tc.name, n, i+1)
		}
	}

	// Refused for now. The one connection MAX_CONNECTIONS allows is taken;
	// the user sends a message, which connects.
	config, err := websocket.NewConfig("ws://"+addr+"/holder/ws/"+sessionID, "http://localhost")
	if err != nil {
		t.Fatal(err)
	}
	config.Header.Set("Authorization", "Bearer "+token)
	holder, err := websocket.DialConfig(config)
	if err != nil {
		t.Fatalf("the connection that fills the proxy: %v", err)
	}
	t.Cleanup(func() { holder.Close() })
	page.eval(`document.getElementById("session").value = ` + exJS(sessionID) + `; document.getElementById("token").value = ` + exJS(token) + `; true`)
	kept := `{"type":"chat","text":"sent while the proxy was full"}`
	page.eval(`document.getElementById("outgoing").value = ` + exJS(kept) + `; document.getElementById("send").click(); true`)
	page.waitFor("the page backing off after 4503",
		`document.getElementById("close-code").dataset.code === "4503" && document.getElementById("status").dataset.state === "reconnecting"`)
	if got := page.eval(`document.getElementById("close-code").dataset.reason`); got != "too_many_connections" {
		t.Errorf("#close-code data-reason = %v, want too_many_connections", got)
	}
	if _, retrying, text := status(); retrying != "true" || !strings.Contains(text, "too_many_connections (4503)") {
		t.Errorf("#status %q, data-retrying=%s; want the reason and retrying", text, retrying)
	}
	// Retries, further and further apart: attempt 2 comes 0.4-0.6 s after
	// the first refusal, attempt 3 0.8-1.2 s after the second.
	page.waitFor("a third attempt scheduled", `document.getElementById("status").textContent.includes("attempt 3")`)
	if n := resMetric(t, addr, `wsproxy_connections_total{result="rejected"}`); n < 2 {
		t.Errorf("the proxy refused %v handshakes as too_many_connections, want the first and a retry", n)
	}
	select {
	case got := <-up:
		t.Fatalf("%s reached the up channel through a refused connection", got)
	default:
	}
	// Room again: the page connects by itself and sends what was kept, once.
	holder.Close()
	page.waitFor("the page to connect once there is room", `document.getElementById("status").dataset.state === "open"`)
	if _, retrying, _ := status(); retrying != "false" {
		t.Errorf("open, data-retrying = %s, want false", retrying)
	}
	select {
	case got := <-up:
		if string(got) != kept {
			t.Fatalf("up channel received %q, want %q", got, kept)
		}
	case <-time.After(exWait):
		t.Fatalf("the message kept while refused never arrived; page: %s", page.state())
	}
	select {
	case got := <-up:
		t.Fatalf("up channel received %q as well, want the kept message once", got)
	case <-time.After(500 * time.Millisecond):
	}
}

// exPage drives one page of a headless Chromium over the DevTools protocol.
type exPage struct {
	t      *testing.T
	ws     *websocket.Conn
	nextID int
	events []string // methods of the events received while waiting for replies
}

// exChromiumPath returns Debian's chromium, or skips the test.
func exChromiumPath(t *testing.T) string {
	const debian = "/usr/bin/chromium"
	if _, err := os.Stat(debian); err == nil {
		return debian
	}
	if path, err := exec.LookPath("chromium"); err == nil {
		return path
	}
	t.Skip("chromium not installed (apt-get install chromium); the browser client is not tested")
	return ""
}

// exOpenPage starts a headless Chromium showing pageURL and connects to the
// page's DevTools endpoint.
func exOpenPage(t *testing.T, chromium, pageURL string) *exPage {
	t.Helper()
	// Removed after Chromium is killed (cleanups run last-registered first).
	profile, err := os.MkdirTemp("", "ex-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(profile) })

	const devtoolsOrigin = "http://127.0.0.1"
	browser := exStart(t, "chromium", profile, exEnv(), nil, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-breakpad", "--user-data-dir="+profile, "--remote-debugging-port=0",
		"--remote-debugging-address=127.0.0.1", "--remote-allow-origins="+devtoolsOrigin, "about:blank")
	listening := regexp.MustCompile(`DevTools listening on ws://([0-9.:]+)/`)
	output := browser.waitOutput(t, "the DevTools address", func(s string) bool { return listening.MatchString(s) })
	devtools := listening.FindStringSubmatch(output)[1]

	// The blank page Chromium opens is a target of type "page".
	var target string
	deadline := time.Now().Add(exWait)
	for target == "" {
		if time.Now().After(deadline) {
			t.Fatalf("chromium lists no blank page")
		}
		var targets []struct{ Type, URL, WebSocketDebuggerURL string }
		if response, err := (&http.Client{Timeout: time.Second}).Get("http://" + devtools + "/json/list"); err == nil {
			json.NewDecoder(response.Body).Decode(&targets)
			response.Body.Close()
		}
		for _, candidate := range targets {
			if candidate.Type == "page" && candidate.URL == "about:blank" {
				target = candidate.WebSocketDebuggerURL
			}
		}
		if target == "" {
			time.Sleep(50 * time.Millisecond) // Chromium offers no event for this before a DevTools connection exists
		}
	}
	config, err := websocket.NewConfig(target, devtoolsOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(config)
	if err != nil {
		t.Fatalf("connecting to chromium's DevTools: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	page := &exPage{t: t, ws: ws}
	page.call("Page.enable", map[string]any{})
	page.call("Page.navigate", map[string]any{"url": pageURL})
	page.waitEvent("Page.loadEventFired")
	return page
}

// call sends one DevTools command and returns its result, skipping events.
func (p *exPage) call(method string, params any) json.RawMessage {
	p.t.Helper()
	p.nextID++
	id := p.nextID
	if err := websocket.JSON.Send(p.ws, map[string]any{"id": id, "method": method, "params": params}); err != nil {
		p.t.Fatalf("DevTools %s: %v", method, err)
	}
	p.ws.SetReadDeadline(time.Now().Add(exWait + 10*time.Second))
	for {
		var reply struct {
			ID     int
			Method string
			Result json.RawMessage
			Error  *struct{ Message string }
		}
		if err := websocket.JSON.Receive(p.ws, &reply); err != nil {
			p.t.Fatalf("DevTools %s: %v", method, err)
		}
		if reply.ID != id {
			if reply.Method != "" {
				p.events = append(p.events, reply.Method)
			}
			continue
		}
		if reply.Error != nil {
			p.t.Fatalf("DevTools %s: %s", method, reply.Error.Message)
		}
		return reply.Result
	}
}

// waitEvent waits for a DevTools event, which may have come already.
func (p *exPage) waitEvent(method string) {
	p.t.Helper()
	p.ws.SetReadDeadline(time.Now().Add(exWait))
	for {
		for i, seen := range p.events {
			if seen == method {
				p.events = p.events[i+1:]
				return
			}
		}
		p.events = p.events[:0]
		var event struct{ Method string }
		if err := websocket.JSON.Receive(p.ws, &event); err != nil {
			p.t.Fatalf("waiting for DevTools event %s: %v", method, err)
		}
		if event.Method != "" {
			p.events = append(p.events, event.Method)
		}
	}
}

// eval evaluates a JavaScript expression in the page, awaiting a promise.
func (p *exPage) eval(expression string) any {
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
func (p *exPage) waitFor(what, condition string) {
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
	})`, exWait.Milliseconds(), condition)
	if p.eval(expression) != true {
		p.t.Fatalf("the page never showed %s; page: %s", what, p.state())
	}
}

// state describes the page for failure messages.
func (p *exPage) state() string {
	value := p.eval(`JSON.stringify({status: document.getElementById("status").textContent,
		log: [...document.querySelectorAll("#log li")].map(e => e.textContent)})`)
	text, _ := value.(string)
	return text
}

// exJS quotes s as a JavaScript string literal.
func exJS(s string) string {
	quoted, _ := json.Marshal(s)
	return string(quoted)
}

// ---------------------------------------------------------------------------
// The FastAPI worker

// TestFastAPIWorker runs examples/fastapi_worker with the command
// examples/README.md gives (Debian's python3), on a port of its own, and
// drives a session end to end: create it over HTTP, connect a WebSocket
// client through the proxy, ask over HTTP and receive the streamed tokens and
// stream_end, then ask and send through the up channel and get the answers.
func TestFastAPIWorker(t *testing.T) {
	command := exDocCommand(t, "examples/README.md", " -m uvicorn ")
	python := command[0]
	if err := exec.Command(python, "-c", "import fastapi, uvicorn, redis.asyncio").Run(); err != nil {
		t.Skipf("%s cannot import fastapi, uvicorn and redis.asyncio (apt-get install python3-fastapi python3-uvicorn python3-redis): %v", python, err)
	}
	redisURL := exRedisURL(t)
	bin := exBuild(t)
	proxyPort := resFreePort(t)
	exStartProxy(t, bin, redisURL, proxyPort)
	proxyURL := fmt.Sprintf("ws://127.0.0.1:%d", proxyPort)

	// The documented command, run from the repository root as documented,
	// with the port changed to one that is free.
	workerPort := resFreePort(t)
	args := append([]string(nil), command[1:]...)
	if i := slices.Index(args, "--port"); i < 0 || i+1 == len(args) {
		t.Fatalf("examples/README.md: %q names no --port", command)
	} else {
		args[i+1] = strconv.Itoa(workerPort)
	}
	root, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	worker := exStart(t, "fastapi worker", root,
		exEnv("REDIS_URL="+redisURL, "WSPROXY_URL="+proxyURL, "TOKEN_DELAY_SECS=0.01", "PYTHONDONTWRITEBYTECODE=1"), nil,
		python, append(args, "--host", "127.0.0.1")...)
	worker.waitOutput(t, "uvicorn to listen", func(s string) bool { return strings.Contains(s, "Uvicorn running on") })
	api := fmt.Sprintf("http://127.0.0.1:%d", workerPort)

	var session struct {
		SessionID string `json:"session_id"`
		AgentID   string `json:"agent_id"`
		Token     string `json:"token"`
		WSURL     string `json:"ws_url"`
	}
	exPostJSON(t, api+"/sessions?agent_id=test-agent", "", http.StatusOK, &session)
	if want := proxyURL + "/test-agent/ws/" + session.SessionID; session.WSURL != want || session.Token == "" || session.AgentID != "test-agent" {
		t.Fatalf("POST /sessions = %+v, want ws_url %s and a token", session, want)
	}
	stored, _ := redis.String(exRedisDo(t, redisURL, "GET", "session:"+session.SessionID+":auth"), nil)
	if stored != session.Token {
		t.Fatalf("session:%s:auth holds %q, want the token the worker returned", session.SessionID, stored)
	}

	config, err := websocket.NewConfig(session.WSURL, "http://localhost")
	if err != nil {
		t.Fatal(err)
	}
	config.Header.Set("Authorization", "Bearer "+session.Token)
	ws, err := websocket.DialConfig(config)
	if err != nil {
		t.Fatalf("connecting to %s: %v", session.WSURL, err)
	}
	t.Cleanup(func() { ws.Close() })

	// Ask over HTTP; the answer streams down token by token.
	exPostJSON(t, api+"/sessions/"+session.SessionID+"/ask", `{"prompt":"Why is the sky blue?"}`, http.StatusAccepted, nil)
	exExpectStream(t, ws, "Why is the sky blue?")

	// Ask through the up channel.
	if err := websocket.Message.Send(ws, `{"prompt":"And the sunset?"}`); err != nil {
		t.Fatal(err)
	}
	exExpectStream(t, ws, "And the sunset?")

	// Any other message is echoed.
	if err := websocket.Message.Send(ws, `{"type":"ping","seq":7}`); err != nil {
		t.Fatal(err)
	}
	if got, want := exReceive(t, ws), `{"type":"data","payload":{"echo":{"type":"ping","seq":7}}}`; got != want {
		t.Fatalf("echo = %s, want %s", got, want)
	}

	exPostJSON(t, api+"/sessions/no-such-session/ask", `{"prompt":"hello?"}`, http.StatusNotFound, nil)

	// Ctrl+C stops it cleanly: the shutdown handler cancels the listener.
	worker.cmd.Process.Signal(syscall.SIGINT)
	if err := worker.waitExit(exWait); err != nil {
		t.Fatalf("worker after SIGINT: %v", err)
	}
	if output := worker.output.String(); !strings.Contains(output, "Application shutdown complete") || strings.Contains(output, "Traceback") {
		t.Fatalf("worker did not shut down cleanly:\n%s", output)
	}
}

// exExpectStream reads one streamed answer: at least two data messages with
// text payloads that together mention the prompt, then stream_end.
func exExpectStream(t *testing.T, ws *websocket.Conn, prompt string) {
	t.Helper()
	var answer strings.Builder
	tokens := 0
	for {
		raw := exReceive(t, ws)
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

// exReceive reads one text message.
func exReceive(t *testing.T, ws *websocket.Conn) string {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(exWait))
	var message string
	if err := websocket.Message.Receive(ws, &message); err != nil {
		t.Fatalf("receiving: %v", err)
	}
	return message
}

// exPostJSON posts body and decodes the answer into result when not nil.
func exPostJSON(t *testing.T, target, body string, wantStatus int, result any) {
	t.Helper()
	client := &http.Client{Timeout: exWait}
	response, err := client.Post(target, "application/json", strings.NewReader(body))
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

// ---------------------------------------------------------------------------
// The Go example programs

// TestExampleClientReassemblesFragmentsAndReportsClose runs ws_bidir_client
// against a server that splits a message over three frames with a ping
// between them, sends a control error and closes with code 4000: the client
// prints the whole message, the control error, the close code and reason,
// answers the ping and echoes the close code.
func TestExampleClientReassemblesFragmentsAndReportsClose(t *testing.T) {
	bin := exBuild(t)
	type frame struct {
		opcode  byte
		payload string
	}
	received := make(chan []frame, 1)
	authorization := make(chan string, 1)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		authorization <- r.Header.Get("Authorization")
		accept := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		conn, buffered, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(exWait))
		buffered.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(accept[:]) + "\r\n\r\n")
		exWriteFrame(buffered.Writer, false, 0x1, []byte("frag"))
		exWriteFrame(buffered.Writer, true, 0x9, []byte("are you there?"))
		exWriteFrame(buffered.Writer, false, 0x0, []byte("mented "))
		exWriteFrame(buffered.Writer, true, 0x0, []byte("message"))
		exWriteFrame(buffered.Writer, true, 0x1, []byte(`{"type":"control","command":"error","code":"invalid_json","message":"messages must be valid JSON"}`))
		exWriteFrame(buffered.Writer, true, 0x8, append([]byte{0x0f, 0xa0}, "bye"...)) // 4000
		buffered.Flush()
		var frames []frame
		for {
			opcode, payload, err := exReadClientFrame(buffered.Reader)
			if err != nil {
				break
			}
			frames = append(frames, frame{opcode, string(payload)})
			if opcode == 0x8 {
				break
			}
		}
		received <- frames
	}))
	t.Cleanup(server.Close)

	client := exStart(t, "ws_bidir_client", t.TempDir(),
		exEnv("WSPROXY_URL="+strings.Replace(server.URL, "http://", "ws://", 1)), nil,
		filepath.Join(bin, "ws_bidir_client"), "-ping-interval", "0", "agent-1", "session-1", "secret-token")
	if err := client.waitExit(exWait); err != nil {
		t.Fatalf("ws_bidir_client: %v\n%s", err, client.output)
	}
	exExpectLines(t, "ws_bidir_client", client.output.String(), []string{
		"connecting to ws://127.0.0.1:...",
		"connected",
		"received: fragmented message",
		`control error: code=invalid_json message="messages must be valid JSON"`,
		`closed: code=4000 reason="bye"`,
	})
	if got := <-authorization; got != "Bearer secret-token" {
		t.Errorf("Authorization header = %q, want the bearer token", got)
	}
	select {
	case frames := <-received:
		want := []frame{{0xa, "are you there?"}, {0x8, "\x0f\xa0"}}
		if fmt.Sprint(frames) != fmt.Sprint(want) {
			t.Errorf("the client sent %v, want a pong with the ping's data and a close frame echoing 4000: %v", frames, want)
		}
	case <-time.After(exWait):
		t.Fatal("the server never saw the client's close frame")
	}
}

// TestExampleClientRefusal: a refused connect is one handshake (one
// refusal in the proxy's metrics and log), prints the reason on one line
// and exits with status 3 (refused for good) or 4 (refused for now). Against
// the proxy, which answers the client's Origin header with a 101 and a close
// 4000 + status, "connected" is never printed; against a server answering
// the HTTP status with the proxy's JSON body, the message is printed too.
func TestExampleClientRefusal(t *testing.T) {
	bin := exBuild(t)
	redisURL := exRedisURL(t)
	port := resFreePort(t)
	proxy := exStartProxy(t, bin, redisURL, port, "MAX_CONNECTIONS=1")
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	sessionID, token := exRandomID("client"), exRandomID("token")
	exRedisDo(t, redisURL, "SET", "session:"+sessionID+":auth", token, "EX", 600)

	// run runs the client to its exit and returns what it printed and its exit status.
	run := func(wsURL string, args ...string) (string, int) {
		t.Helper()
		client := exStart(t, "ws_bidir_client", t.TempDir(), exEnv("WSPROXY_URL="+wsURL), nil,
			filepath.Join(bin, "ws_bidir_client"), append([]string{"-ping-interval", "0"}, args...)...)
		err := client.waitExit(exWait)
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			t.Fatalf("ws_bidir_client %q: %v, want a non-zero exit status\n%s", args, err, client.output)
		}
		return client.output.String(), exit.ExitCode()
	}
	expect := func(name, output string, status int, want []string, wantStatus int) {
		t.Helper()
		if got := strings.Split(strings.TrimSpace(output), "\n"); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: printed\n%s\nwant exactly\n%s", name, output, strings.Join(want, "\n"))
		}
		if status != wantStatus {
			t.Errorf("%s: exit status %d, want %d", name, status, wantStatus)
		}
	}

	var holder *websocket.Conn
	for i, tc := range []struct {
		name, session, token, refusal, result string
		status                                int
	}{
		{"unknown session", "no-such-session", token, "refused: 4401 unknown_session", "unauthorized", 3},
		{"wrong token", sessionID, "wrong-token", "refused: 4403 invalid_token", "forbidden", 3},
		{"too many connections", sessionID, token, "refused: 4503 too_many_connections", "rejected", 4},
	} {
		if tc.result == "rejected" { // take the one connection MAX_CONNECTIONS allows
			config, err := websocket.NewConfig("ws://"+addr+"/holder/ws/"+sessionID, "http://localhost")
			if err != nil {
				t.Fatal(err)
			}
			config.Header.Set("Authorization", "Bearer "+token)
			if holder, err = websocket.DialConfig(config); err != nil {
				t.Fatalf("the connection that fills the proxy: %v", err)
			}
			t.Cleanup(func() { holder.Close() })
		}
		output, status := run("ws://"+addr, "agent-1", tc.session, tc.token)
		expect(tc.name, output, status, []string{"connecting to ws://" + addr + "/agent-1/ws/" + tc.session, tc.refusal}, tc.status)
		series := `wsproxy_connections_total{result="` + tc.result + `"}`
		if n := resMetric(t, addr, series); n != 1 {
			t.Errorf("%s: %s = %v, want 1: one handshake", tc.name, series, n)
		}
		if n := strings.Count(proxy.output.String(), `msg="handshake refused"`); n != i+1 {
			t.Errorf("%s: the proxy logged %d refusals in all, want %d:\n%s", tc.name, n, i+1, proxy.output)
		}
	}

	// A refusal by HTTP status (the proxy's answer to a request without an
	// Origin header), from a server that counts the handshakes it answers.
	var mu sync.Mutex
	handshakes := 0
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		handshakes++
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
	wsURL := strings.Replace(server.URL, "http://", "ws://", 1)
	for _, tc := range []struct {
		name, session, refusal string
		status                 int
	}{
		{"HTTP 401", "gone", "refused: 401 unknown_session: no token is stored for this session", 3},
		{"HTTP 503", "draining", "refused: 503 draining: the server is shutting down; reconnect to another instance", 4},
	} {
		mu.Lock()
		handshakes = 0
		mu.Unlock()
		output, status := run(wsURL, "agent-1", tc.session, token)
		expect(tc.name, output, status, []string{"connecting to " + wsURL + "/agent-1/ws/" + tc.session, tc.refusal}, tc.status)
		mu.Lock()
		if handshakes != 1 {
			t.Errorf("%s: the server answered %d handshakes, want 1", tc.name, handshakes)
		}
		mu.Unlock()
	}
}

// TestExamplesRejectBadArguments: each program exits with status 2 and a
// one-line usage when its arguments are wrong.
func TestExamplesRejectBadArguments(t *testing.T) {
	bin := exBuild(t)
	for _, run := range [][]string{
		{"auth_token_setter"},
		{"auth_token_setter", "demo", "token", "soon"},
		{"auth_token_setter", "bad/session", "token"},
		{"redis_publisher", "one", "two"},
		{"redis_publisher", "-interval", "0s"},
		{"redis_publisher", "-count", "-1"},
		{"redis_subscriber"},
		{"redis_subscriber", "a b"},
		{"ws_bidir_client", "agent-1", "demo"},
		{"ws_bidir_client", "agent 1", "demo", "token"},
	} {
		cmd := exec.Command(filepath.Join(bin, run[0]), run[1:]...)
		cmd.Env = exEnv("REDIS_URL=redis://127.0.0.1:1", "WSPROXY_URL=ws://127.0.0.1:1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.HasPrefix(stderr.String(), "usage: "+run[0]) {
			t.Errorf("%q: %v, stderr %q; want exit status 2 and a usage line", run, err, stderr.String())
		}
	}
}

// exWriteFrame writes one unmasked server frame with a short payload.
func exWriteFrame(w *bufio.Writer, final bool, opcode byte, payload []byte) {
	first := opcode
	if final {
		first |= 0x80
	}
	w.Write([]byte{first, byte(len(payload))})
	w.Write(payload)
}

// exReadClientFrame reads one masked client frame with a short payload.
func exReadClientFrame(r *bufio.Reader) (opcode byte, payload []byte, err error) {
	header := make([]byte, 6)
	if _, err := io.ReadFull(r, header); err != nil {
		return 0, nil, err
	}
	length := int(header[1] & 0x7f)
	if header[1]&0x80 == 0 || length > 125 {
		return 0, nil, errors.New("not a short masked frame")
	}
	payload = make([]byte, length)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, err
	}
	for i := range payload {
		payload[i] ^= header[2+i%4]
	}
	return header[0] & 0x0f, payload, nil
}

// ---------------------------------------------------------------------------
// The walkthroughs

// TestWalkthrough runs the walkthroughs of README.md and examples/README.md
// exactly as written, against a real proxy and Redis, and checks that each
// terminal prints what the document says it prints.
//
// A document marks its walkthrough with HTML comments, invisible once
// rendered, each followed by a fenced block where one is expected:
//
//	<!-- walkthrough: terminal N -->         commands typed in terminal N, one a line
//	<!-- walkthrough: terminal N output -->  lines terminal N prints from then on, in order;
//	                                         "..." stands for any text
//	<!-- walkthrough: terminal N input -->   lines typed into the program running in terminal N
//	<!-- walkthrough: terminal N ctrl+c -->  Ctrl+C in terminal N (no block); it must exit with status 0
//	<!-- walkthrough: terminal N exit S -->  the program in terminal N exits with status S (no block)
//
// Steps run in document order. A command runs to completion, with status 0,
// before the next step unless an output block or an exit status for its
// terminal follows it directly (then that output is awaited, and a status
// other than 0 must be the one an exit marker names) or it starts the proxy
// (then /ready is awaited).
// Commands may be `redis-cli ...`, `curl ...`, `go run .` (the proxy) and
// `go run ./examples/NAME ...`, with optional VAR=value prefixes and simple
// shell quoting; anything else fails the test, so a document cannot show a
// step the test skips. The proxy and the examples run as binaries built
// once; redis-cli talks to the test's Redis; curl's 127.0.0.1:8080 (or
// localhost:8080) is the test's proxy. In the output, the test's proxy and
// Redis addresses read as the defaults (127.0.0.1:8080 and 127.0.0.1:6379).
func TestWalkthrough(t *testing.T) {
	for _, document := range []string{"README.md", "examples/README.md"} {
		t.Run(document, func(t *testing.T) {
			steps, err := exParseWalkthrough(document)
			if err != nil {
				t.Fatal(err)
			}
			// The documents use fixed ids (session "demo"), so each run gets
			// a Redis of its own when redis-server is installed.
			redisURL := ""
			if _, err := exec.LookPath("redis-server"); err == nil {
				redisURL = exStartRedis(t)
			} else {
				redisURL = exRedisURL(t)
			}
			exRunWalkthrough(t, steps, exBuild(t), redisURL)
		})
	}
}

// TestWalkthroughPorts checks what examples/README.md shows but the
// walkthrough cannot run, because its output differs on every run: the
// static server of the browser page and the FastAPI worker, which run side
// by side. Each has a port of its own, neither the proxy's nor Redis's;
// every address in the document is one of the four; the page's links go to
// the static server and the worker's endpoints to the worker; the worker
// runs with Debian's /usr/bin/python3, the interpreter that sees the
// python3-fastapi, python3-uvicorn and python3-redis packages.
// (TestFastAPIWorker runs the worker's command itself.)
func TestWalkthroughPorts(t *testing.T) {
	const document = "examples/README.md"
	text, err := os.ReadFile(document)
	if err != nil {
		t.Fatal(err)
	}
	static := exDocCommand(t, document, " -m http.server ")
	worker := exDocCommand(t, document, " -m uvicorn ")
	staticPort := static[len(static)-1]
	workerPort := ""
	if i := slices.Index(worker, "--port"); i >= 0 && i+1 < len(worker) {
		workerPort = worker[i+1]
	}
	if worker[0] != "/usr/bin/python3" {
		t.Errorf("the worker runs with %s, want Debian's /usr/bin/python3", worker[0])
	}
	if _, err := strconv.Atoi(staticPort); err != nil || staticPort == workerPort || staticPort == "8080" || staticPort == "6379" ||
		workerPort == "" || workerPort == "8080" || workerPort == "6379" {
		t.Fatalf("static server on port %q, worker on %q: want two ports of their own, neither 8080 (the proxy) nor 6379 (Redis)", staticPort, workerPort)
	}
	address := regexp.MustCompile(`(?:127\.0\.0\.1|localhost):(\d+)([^\s>)'` + "`" + `]*)`)
	for n, line := range strings.Split(string(text), "\n") {
		for _, match := range address.FindAllStringSubmatch(line, -1) {
			port, rest := match[1], match[2]
			want := ""
			switch {
			case strings.Contains(rest, "autoconnect=") || strings.HasPrefix(rest, "/?url="):
				want = staticPort // a link to the page
			case strings.HasPrefix(rest, "/sessions"):
				want = workerPort
			}
			switch {
			case want != "" && port != want:
				t.Errorf("%s:%d: %s: port %s, want %s", document, n+1, match[0], port, want)
			case port != "8080" && port != "6379" && port != staticPort && port != workerPort:
				t.Errorf("%s:%d: %s: port %s is neither the proxy's, Redis's, the static server's (%s) nor the worker's (%s)",
					document, n+1, match[0], port, staticPort, workerPort)
			}
		}
	}
}

// exDocCommand returns, split into words, the one command of a document's
// fenced blocks that contains part.
func exDocCommand(t *testing.T, path, part string) []string {
	t.Helper()
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	inBlock := false
	for _, line := range strings.Split(string(text), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "```") {
			inBlock = !inBlock
			continue
		}
		if inBlock && !strings.HasPrefix(trimmed, "#") && strings.Contains(" "+trimmed+" ", part) {
			found = append(found, trimmed)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s: %d commands contain %q, want 1: %q", path, len(found), part, found)
	}
	words, err := exSplitWords(found[0])
	if err != nil {
		t.Fatal(err)
	}
	return words
}

// exStep is one marked step of a walkthrough.
type exStep struct {
	line     int    // of the marker, for messages
	terminal int    // N of "terminal N"
	kind     string // "commands", "output", "input", "ctrl+c" or "exit"
	lines    []string
	status   int // of "exit"
}

var exMarker = regexp.MustCompile(`^<!--\s*walkthrough:\s*terminal\s+(\d+)(?:\s+(output|input|ctrl\+c|exit\s+(\d+)))?\s*-->$`)

// exParseWalkthrough reads the marked steps of a markdown document.
func exParseWalkthrough(path string) ([]exStep, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(text), "\n")
	var steps []exStep
	for i := 0; i < len(lines); i++ {
		if strings.HasPrefix(strings.TrimSpace(lines[i]), "<!--") && strings.Contains(lines[i], "walkthrough") &&
			!exMarker.MatchString(strings.TrimSpace(lines[i])) {
			return nil, fmt.Errorf("%s:%d: malformed walkthrough marker %q", path, i+1, lines[i])
		}
		match := exMarker.FindStringSubmatch(strings.TrimSpace(lines[i]))
		if match == nil {
			continue
		}
		step := exStep{line: i + 1, kind: match[2]}
		step.terminal, _ = strconv.Atoi(match[1])
		switch {
		case step.kind == "":
			step.kind = "commands"
		case strings.HasPrefix(step.kind, "exit"):
			step.kind = "exit"
			step.status, _ = strconv.Atoi(match[3])
		}
		if step.kind != "ctrl+c" && step.kind != "exit" {
			// The fenced block must follow, after blank lines at most.
			j := i + 1
			for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
				j++
			}
			if j == len(lines) || !strings.HasPrefix(lines[j], "```") {
				return nil, fmt.Errorf("%s:%d: a walkthrough marker must be followed by a fenced block", path, i+1)
			}
			for j++; j < len(lines) && !strings.HasPrefix(lines[j], "```"); j++ {
				line := strings.TrimRight(lines[j], " \t\r")
				if line == "" || (step.kind == "commands" && strings.HasPrefix(line, "#")) {
					continue
				}
				step.lines = append(step.lines, line)
			}
			if j == len(lines) {
				return nil, fmt.Errorf("%s:%d: unclosed fenced block", path, i+1)
			}
			i = j
		}
		steps = append(steps, step)
	}
	if len(steps) == 0 {
		return nil, fmt.Errorf("%s has no walkthrough markers (<!-- walkthrough: terminal N --> before a fenced block of commands)", path)
	}
	return steps, nil
}

// exTerminal is what one terminal of a walkthrough shows.
type exTerminal struct {
	output  *exOutput
	running *exProcess // nil when the terminal is at its prompt
	matched int        // output lines already matched by output blocks
}

func exRunWalkthrough(t *testing.T, steps []exStep, bin, redisURL string) {
	proxyPort := resFreePort(t)
	redisAddress := strings.TrimPrefix(redisURL, "redis://")
	if u, err := url.Parse(redisURL); err == nil {
		redisAddress = u.Host
	}
	env := exEnv("REDIS_URL="+redisURL, "HOST=127.0.0.1", "PORT="+strconv.Itoa(proxyPort),
		fmt.Sprintf("WSPROXY_URL=ws://127.0.0.1:%d", proxyPort))
	// The proxy's address as the test runs it and as the document shows it.
	toTest := strings.NewReplacer("127.0.0.1:8080", fmt.Sprintf("127.0.0.1:%d", proxyPort), "localhost:8080", fmt.Sprintf("localhost:%d", proxyPort))
	normalize := strings.NewReplacer(fmt.Sprintf("127.0.0.1:%d", proxyPort), "127.0.0.1:8080", redisAddress, "127.0.0.1:6379")
	workDir := t.TempDir() // not the repository: no .env file is read by accident

	terminals := map[int]*exTerminal{}
	terminal := func(n int) *exTerminal {
		if terminals[n] == nil {
			terminals[n] = &exTerminal{output: exNewOutput()}
		}
		return terminals[n]
	}
	t.Cleanup(func() {
		if t.Failed() {
			for n, term := range terminals {
				t.Logf("terminal %d printed:\n%s", n, term.output)
			}
		}
	})

	for i, step := range steps {
		where := fmt.Sprintf("line %d (terminal %d)", step.line, step.terminal)
		term := terminal(step.terminal)
		switch step.kind {
		case "commands":
			for k, line := range step.lines {
				if term.running != nil { // the user waits for the prompt
					if err := term.running.waitExit(exWait); err != nil {
						t.Fatalf("%s: before %q: %v (does the document miss a Ctrl+C?)", where, line, err)
					}
					term.running = nil
				}
				name, path, args, extraEnv, isProxy, err := exCommand(line, bin, redisURL, toTest)
				if err != nil {
					t.Fatalf("%s: %v", where, err)
				}
				fmt.Fprintf(term.output, "$ %s\n", line)
				process := exStart(t, name, workDir, append(append([]string(nil), env...), extraEnv...), term.output, path, args...)
				term.running = process
				last := k == len(step.lines)-1
				switch {
				case isProxy:
					exWaitReady(t, process, proxyPort)
				case last && exNextIs(steps, i, "output", "exit"):
					// The output block or exit status that follows says when it is ready.
				default:
					if err := process.waitExit(exWait); err != nil {
						t.Fatalf("%s: %q: %v", where, line, err)
					}
					term.running = nil
				}
			}
		case "output":
			deadline := time.After(exWait)
			for {
				snapshot, changed := term.output.snapshot()
				lines := strings.Split(normalize.Replace(snapshot), "\n")
				if end, ok := exMatchLines(lines[term.matched:], step.lines); ok {
					term.matched += end
					break
				}
				var exited <-chan struct{}
				if term.running != nil {
					exited = term.running.exited
				}
				select {
				case <-changed:
					continue
				case <-exited:
					// Look once more at the output it left, then give up.
					if final, _ := term.output.snapshot(); final == snapshot {
						t.Fatalf("%s: the program exited without printing:\n%s", where, strings.Join(step.lines, "\n"))
					}
					continue
				case <-deadline:
				}
				t.Fatalf("%s: after %v terminal %d has not printed:\n%s", where, exWait, step.terminal, strings.Join(step.lines, "\n"))
			}
			if term.running != nil && exHasExited(term.running) {
				switch {
				case term.running.err == nil:
					term.running = nil
				case !exNextIs(steps, i, "exit"):
					t.Fatalf("%s: %s: %v", where, term.running.name, term.running.err)
				}
			}
		case "input":
			if term.running == nil {
				t.Fatalf("%s: input for a terminal that runs nothing", where)
			}
			for _, line := range step.lines {
				fmt.Fprintf(term.output, "%s\n", line) // a terminal echoes what is typed
				if _, err := io.WriteString(term.running.stdin, line+"\n"); err != nil {
					t.Fatalf("%s: typing into %s: %v", where, term.running.name, err)
				}
			}
		case "ctrl+c":
			if term.running == nil {
				t.Fatalf("%s: Ctrl+C in a terminal that runs nothing", where)
			}
			term.running.cmd.Process.Signal(syscall.SIGINT)
			if err := term.running.waitExit(exWait); err != nil {
				t.Fatalf("%s: %s after Ctrl+C: %v", where, term.running.name, err)
			}
			term.running = nil
		case "exit":
			if term.running == nil {
				t.Fatalf("%s: an exit status for a terminal that runs nothing", where)
			}
			status := 0
			var exit *exec.ExitError
			if err := term.running.waitExit(exWait); errors.As(err, &exit) {
				status = exit.ExitCode()
			} else if err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			if status != step.status {
				t.Fatalf("%s: %s exited with status %d, want %d", where, term.running.name, status, step.status)
			}
			term.running = nil
		}
	}
}

// exNextIs tells whether the step after steps[i] is of one of kinds, for the
// same terminal.
func exNextIs(steps []exStep, i int, kinds ...string) bool {
	return i+1 < len(steps) && steps[i+1].terminal == steps[i].terminal && slices.Contains(kinds, steps[i+1].kind)
}

// exAssignment is a VAR=value word before a command.
var exAssignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// exCommand maps one walkthrough command to the program the test runs.
func exCommand(line, bin, redisURL string, proxyAddress *strings.Replacer) (name, path string, args, env []string, isProxy bool, err error) {
	words, err := exSplitWords(line)
	if err != nil {
		return "", "", nil, nil, false, err
	}
	for len(words) > 0 && exAssignment.MatchString(words[0]) {
		env = append(env, words[0])
		words = words[1:]
	}
	switch {
	case len(words) >= 1 && words[0] == "redis-cli":
		path, err := exec.LookPath("redis-cli")
		if err != nil {
			return "", "", nil, nil, false, fmt.Errorf("redis-cli is not installed")
		}
		// --no-raw: print replies as on a terminal ("(integer) 1").
		return "redis-cli", path, append([]string{"-u", redisURL, "--no-raw"}, words[1:]...), env, false, nil
	case len(words) >= 1 && words[0] == "curl":
		path, err := exec.LookPath("curl")
		if err != nil {
			return "", "", nil, nil, false, fmt.Errorf("curl is not installed")
		}
		args := make([]string, 0, len(words)-1)
		for _, word := range words[1:] {
			args = append(args, proxyAddress.Replace(word))
		}
		return "curl", path, args, env, false, nil
	case len(words) >= 3 && words[0] == "go" && words[1] == "run" && words[2] == ".":
		return "the proxy", filepath.Join(bin, "wsproxy"), words[3:], env, true, nil
	case len(words) >= 3 && words[0] == "go" && words[1] == "run" && strings.HasPrefix(words[2], "./examples/"):
		example := strings.TrimPrefix(words[2], "./examples/")
		if _, err := os.Stat(filepath.Join(bin, example)); err != nil {
			return "", "", nil, nil, false, fmt.Errorf("%q: no example program %s", line, example)
		}
		return example, filepath.Join(bin, example), words[3:], env, false, nil
	}
	return "", "", nil, nil, false, fmt.Errorf("%q: the walkthrough test runs only redis-cli, curl, `go run .` and `go run ./examples/NAME`", line)
}

// exSplitWords splits a command line as a POSIX shell would, for the
// quoting walkthroughs use: 'single', "double" with \" \\ \$, and \x.
// Variables, globs, pipes and the like are refused rather than misread.
func exSplitWords(line string) ([]string, error) {
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
			i++
			for ; i < len(line) && line[i] != '"'; i++ {
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

// exMatchLines finds want, in order, among lines (other lines may come in
// between); "..." in a wanted line matches any text. It returns how many
// lines were consumed.
func exMatchLines(lines, want []string) (consumed int, ok bool) {
	next := 0
	for _, pattern := range want {
		re := exLinePattern(pattern)
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

func exLinePattern(line string) *regexp.Regexp {
	parts := strings.Split(line, "...")
	for i, part := range parts {
		parts[i] = regexp.QuoteMeta(part)
	}
	return regexp.MustCompile("^" + strings.Join(parts, ".*") + "$")
}

// exExpectLines fails unless output contains want in order (see exMatchLines).
func exExpectLines(t *testing.T, name, output string, want []string) {
	t.Helper()
	if _, ok := exMatchLines(strings.Split(output, "\n"), want); !ok {
		t.Fatalf("%s printed:\n%s\nwant, in order:\n%s", name, output, strings.Join(want, "\n"))
	}
}

// ---------------------------------------------------------------------------
// Processes, Redis and the proxy

// exOutput collects what a process prints and wakes those waiting for more.
type exOutput struct {
	mu      sync.Mutex
	text    bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func exNewOutput() *exOutput { return &exOutput{changed: make(chan struct{})} }

func (o *exOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.text.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

// snapshot returns the output so far and a channel closed when it grows.
func (o *exOutput) snapshot() (string, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.text.String(), o.changed
}

func (o *exOutput) String() string {
	text, _ := o.snapshot()
	return text
}

// exProcess is a program a test started in a process group of its own.
type exProcess struct {
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	output *exOutput
	exited chan struct{} // closed when the process has exited
	err    error         // its exit status, once exited is closed
}

// exStart starts a program (output to output, or a new exOutput when nil)
// and kills its whole process group when the test ends.
func exStart(t *testing.T, name, dir string, env []string, output *exOutput, path string, args ...string) *exProcess {
	t.Helper()
	ownOutput := output == nil // else the caller shows the shared output
	if output == nil {
		output = exNewOutput()
	}
	cmd := exec.Command(path, args...)
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = dir, env, output, output
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 2 * time.Second // a child left holding the output pipe must not hang Wait
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &exProcess{name: name, cmd: cmd, stdin: stdin, output: output, exited: make(chan struct{})}
	go func() { // ends when the process does; the cleanup below waits for it
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.exited:
		case <-time.After(exWait):
			t.Errorf("%s (pid %d) still runs after SIGKILL", name, cmd.Process.Pid)
		}
		if t.Failed() && ownOutput {
			t.Logf("%s printed:\n%s", name, output)
		}
	})
	return p
}

// waitExit waits up to timeout for the process to exit and returns its
// exit status as an error (nil for status 0).
func (p *exProcess) waitExit(timeout time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s still runs after %v", p.name, timeout)
	}
}

func exHasExited(p *exProcess) bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// waitOutput waits until the process's output satisfies done and returns it.
func (p *exProcess) waitOutput(t *testing.T, what string, done func(string) bool) string {
	t.Helper()
	deadline := time.After(exWait)
	for {
		text, changed := p.output.snapshot()
		if done(text) {
			return text
		}
		select {
		case <-changed:
		case <-p.exited:
			if text := p.output.String(); done(text) {
				return text
			}
			t.Fatalf("%s exited (%v) before %s:\n%s", p.name, p.err, what, p.output)
		case <-deadline:
			t.Fatalf("%s: no %s after %v:\n%s", p.name, what, exWait, p.output)
		}
	}
}

// exEnv is the environment without the proxy's variables, plus extra.
func exEnv(extra ...string) []string {
	var env []string
	for _, variable := range os.Environ() {
		name, _, _ := strings.Cut(variable, "=")
		drop := false
		for _, proxyVariable := range exProxyVariables {
			drop = drop || name == proxyVariable
		}
		if !drop {
			env = append(env, variable)
		}
	}
	return append(env, extra...)
}

// exBuild builds the proxy and the example programs into a temporary
// directory and returns it.
func exBuild(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	build := exec.Command("go", "build", "-o", dir+string(filepath.Separator), ".", "./examples/...")
	if output, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, output)
	}
	return dir
}

func exRandomID(prefix string) string {
	b := make([]byte, 8)
	rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// exRedisURL is the Redis under test: WSPROXY_TEST_REDIS_URL, or a
// redis-server of the test's own.
func exRedisURL(t *testing.T) string {
	if redisURL := os.Getenv("WSPROXY_TEST_REDIS_URL"); redisURL != "" {
		return redisURL
	}
	return exStartRedis(t)
}

// exStartRedis starts a throwaway redis-server, or skips the test.
func exStartRedis(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed (apt-get install redis-server) and WSPROXY_TEST_REDIS_URL not set")
	}
	port := resFreePort(t)
	server := exStart(t, "redis-server", t.TempDir(), exEnv(), nil, path,
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	server.waitOutput(t, "readiness", func(s string) bool { return strings.Contains(s, "Ready to accept connections") })
	return fmt.Sprintf("redis://127.0.0.1:%d", port)
}

// exRedisDo runs one command on its own connection.
func exRedisDo(t *testing.T, redisURL, command string, args ...any) any {
	t.Helper()
	conn, err := redis.DialURL(redisURL, redis.DialConnectTimeout(exWait), redis.DialReadTimeout(exWait))
	if err != nil {
		t.Fatalf("Redis at %s: %v", redisURL, err)
	}
	defer conn.Close()
	reply, err := conn.Do(command, args...)
	if err != nil {
		t.Fatalf("Redis %s: %v", command, err)
	}
	return reply
}

func exPublish(t *testing.T, redisURL, channel, message string) int {
	t.Helper()
	receivers, err := redis.Int(exRedisDo(t, redisURL, "PUBLISH", channel, message), nil)
	if err != nil {
		t.Fatal(err)
	}
	return receivers
}

// exSubscribe subscribes to channel and returns the messages published to it.
func exSubscribe(t *testing.T, redisURL, channel string) <-chan []byte {
	t.Helper()
	conn, err := redis.DialURL(redisURL, redis.DialConnectTimeout(exWait))
	if err != nil {
		t.Fatalf("Redis at %s: %v", redisURL, err)
	}
	psc := redis.PubSubConn{Conn: conn}
	if err := psc.Subscribe(channel); err != nil {
		t.Fatal(err)
	}
	if _, ok := psc.ReceiveWithTimeout(exWait).(redis.Subscription); !ok {
		t.Fatalf("SUBSCRIBE %s was not confirmed", channel)
	}
	messages := make(chan []byte, 100)
	done := make(chan struct{})
	go func() { // ends when the cleanup closes the connection
		defer close(done)
		for {
			switch v := psc.Receive().(type) {
			case redis.Message:
				select {
				case messages <- v.Data:
				default: // nobody is reading any more
				}
			case error:
				return
			}
		}
	}()
	t.Cleanup(func() {
		psc.Close()
		<-done
	})
	return messages
}

// exStartProxy runs the proxy binary on 127.0.0.1:port and waits until it is ready.
func exStartProxy(t *testing.T, bin, redisURL string, port int, extraEnv ...string) *exProcess {
	t.Helper()
	env := exEnv(append([]string{"HOST=127.0.0.1", "PORT=" + strconv.Itoa(port), "REDIS_URL=" + redisURL, "LOG_FORMAT=text"}, extraEnv...)...)
	proxy := exStart(t, "wsproxy", t.TempDir(), env, nil, filepath.Join(bin, "wsproxy"))
	exWaitReady(t, proxy, port)
	return proxy
}

// exWaitReady polls /ready until it answers 200 (the proxy announces
// readiness in no other way).
func exWaitReady(t *testing.T, proxy *exProcess, port int) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(exWait)
	for {
		if response, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/ready", port)); err == nil {
			response.Body.Close()
			if response.StatusCode == http.StatusOK {
				return
			}
		}
		if exHasExited(proxy) {
			t.Fatalf("the proxy exited (%v):\n%s", proxy.err, proxy.output)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxy was not ready after %v:\n%s", exWait, proxy.output)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// The fake Redis

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
	if err != nil {
		t.Fatalf("fake redis: %v", err)
	}
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
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func fakeCheck(t *testing.T, what string, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s = %#v, want %#v", what, got, want)
	}
}

// fakeExpectDo runs a command and checks its reply as redigo returns it:
// status "OK" as a string, bulk strings as []byte, integers as int64.
func fakeExpectDo(t *testing.T, conn redis.Conn, want any, command string, args ...any) {
	t.Helper()
	reply, err := conn.Do(command, args...)
	fakeCheck(t, fmt.Sprint(command, args), []any{reply, err}, []any{want, nil})
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
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// fakeReadRaw reads exactly len(want) bytes from a raw socket and compares them.
func fakeReadRaw(t *testing.T, conn net.Conn, want string) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(fakeWaitTimeout))
	got := make([]byte, len(want))
	_, err := io.ReadFull(conn, got)
	fakeCheck(t, "raw read", []any{string(got), err}, []any{want, nil})
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
	fakeCheck(t, "Get", []any{value, ok}, []any{"v\x00\xff", true})
	fakeExpectDo(t, conn, int64(100), "TTL", "k")
	fakeExpectDo(t, conn, int64(1), "EXPIRE", "k", 10)
	fakeExpectDo(t, conn, int64(0), "EXPIRE", "missing", 10)
	fake.FastForward(11 * time.Second)
	fakeExpectDo(t, conn, nil, "GET", "k")
	fakeExpectDo(t, conn, int64(-2), "TTL", "k")
	fake.Set("a", "1")
	fake.Set("b", "2")
	fakeCheck(t, "TTL without expiry", fake.TTL("a"), fakeTTLNone)
	fakeExpectDo(t, conn, int64(2), "DEL", "a", "b", "c")
	fakeExpectDo(t, conn, []byte("hi"), "ECHO", "hi")
	fakeExpectError(t, conn, "unknown command", "FLUSHALL")
	fakeCheck(t, "CommandCount(set)", fake.CommandCount("set"), 1)
	fakeExpectDo(t, conn, "OK", "QUIT")
	fake.WaitConns(t, 0)
}

func TestFakeRedisPubSub(t *testing.T) {
	fake := newFakeRedis(t)
	sub := redis.PubSubConn{Conn: fakeDial(t, fake)}
	receive := func(want any) {
		t.Helper()
		fakeCheck(t, "pubsub receive", sub.ReceiveWithTimeout(fakeWaitTimeout), want)
	}
	sub.Subscribe("a", "b")
	receive(redis.Subscription{Kind: "subscribe", Channel: "a", Count: 1})
	receive(redis.Subscription{Kind: "subscribe", Channel: "b", Count: 2})
	sub.Subscribe("a") // already subscribed: Redis confirms anyway
	receive(redis.Subscription{Kind: "subscribe", Channel: "a", Count: 2})
	fakeCheck(t, "SubscribedChannels", fake.SubscribedChannels(), []string{"a", "b"})
	fakeCheck(t, "Subscribers", fake.Subscribers("a"), 1)

	fakeExpectDo(t, fakeDial(t, fake), int64(1), "PUBLISH", "a", "x\x00y")
	fakeCheck(t, "Publish", fake.Publish("b", []byte{0xff}), 1)
	fakeCheck(t, "Publish without subscribers", fake.Publish("c", []byte("lost")), 0)
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
	fakeCheck(t, "channels after UNSUBSCRIBE", len(fake.SubscribedChannels()), 0)
	fakeCheck(t, "CommandCount(SUBSCRIBE)", fake.CommandCount("SUBSCRIBE"), 2)
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
		fakeCheck(t, "replies", []any{set, setErr, get, getErr}, []any{"OK", nil, []byte(strconv.Itoa(i * i)), nil})
	}
}

func TestFakeRedisHoldSubscribesKeepsReplyOrder(t *testing.T) {
	fake := newFakeRedis(t)
	raw := fakeDialRaw(t, fake)
	fake.HoldSubscribes(true)
	io.WriteString(raw, "PING\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
	fake.WaitSubscribers(t, "ch", 1) // the subscription took effect...
	fakeCheck(t, "Publish while held", fake.Publish("ch", []byte("m")), 1)
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
	fakeCheck(t, "delayed replies", []any{subscribed, subscribeErr, pong, pongErr}, []any{
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
	fakeCheck(t, "Conns after drop", fake.Conns(), 0)
	fakeCheck(t, "Subscribers after drop", fake.Subscribers("a"), 0)
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
	fakeCheck(t, "Conns while refusing", fake.Conns(), 1)
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
	fakeCheck(t, "PINGs executed while frozen", fake.CommandCount("PING"), 1)
	fakeCheck(t, "Conns while frozen", fake.Conns(), 1)
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
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fakeExpectDo(t, conn, "PONG", "PING")
	fakeCheck(t, "CommandCount(SELECT)", fake.CommandCount("SELECT"), 2)
}

// A request x/net/websocket itself refuses after wsproxy's checks (two
// subprotocols offered, none chosen) is answered 400 and leaves nothing.
func TestHandshakeRefusedByLibraryLeavesNothing(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	start := time.Now()
	// A Host that net/http lets through but x/net/websocket cannot parse.
	_, res := tp.dial(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}, "Host": {"%zz"}})
	if res.status != 400 {
		t.Errorf("got %d %s, want 400", res.status, res.body)
	}
	if waited := time.Since(start); waited > 10*time.Second { // the body ends when the socket closes
		t.Errorf("the refused socket stayed open for %v", waited)
	}
	eventually(t, "nothing left", func() bool {
		return len(sessionChannels(fake)) == 0 && tp.p.slots.Load() == 0 && goroutinesIn("wsproxy.(*conn)") == 0
	})
	if got := tp.metric(t, `wsproxy_connections_total{result="bad_request"}`); got != 1 {
		t.Errorf("bad_request count %v", got)
	}
}

// ---------------------------------------------------------------------------
// Limits and abuse: nothing a client claims or holds exhausts the process.

// liveHeap is the heap in use after a collection.
func liveHeap() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// A frame header that claims MAX_MESSAGE_SIZE_BYTES costs what arrived, not
// what it claims: 200 such connections, whole or after a first fragment.
func TestClaimedLengthCostsNoMemory(t *testing.T) {
	for _, fragmented := range []bool{false, true} {
		t.Run(map[bool]string{false: "one frame", true: "after a fragment"}[fragmented], func(t *testing.T) {
			r := newTestRedis(t)
			tp := startProxy(t, r, "AUTH_MODE=none")
			before := liveHeap()
			const n, limit = 200, 1 << 20
			for i := 0; i < n; i++ {
				c := tp.connect(t, "claim", "")
				if fragmented {
					c.writeFrame(false, opText, []byte(`"`+strings.Repeat("f", 4095)))
					c.conn.Write(clientFrameHeader(true, opContinuation, limit-4096))
				} else {
					c.conn.Write(clientFrameHeader(true, opText, limit))
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

// Plain HTTP keep-alive connections are closed when idle, and a request
// must arrive in time; an upgraded WebSocket keeps none of those deadlines.
func TestHTTPIdleAndRequestTimeouts(t *testing.T) {
	defer func(idle, request time.Duration) { httpIdleTimeout, httpRequestTimeout = idle, request }(httpIdleTimeout, httpRequestTimeout)
	httpIdleTimeout, httpRequestTimeout = 300*time.Millisecond, 300*time.Millisecond
	r := newTestRedis(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.2", "SUBSCRIBE_TIMEOUT_SECS=0.2") // writes bounded by 0.7 s
	id, token := r.session(t)
	ws := tp.connect(t, id, token)
	up := r.subscribeUp(t, id)

	closedAfter := func(request string) time.Duration {
		t.Helper()
		nc, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
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
			return time.Since(start)
		}
		if _, err := io.ReadAll(nc); err != nil {
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
	// The WebSocket outlived every one of those deadlines, both ways.
	time.Sleep(time.Second)
	r.publish(t, id, `"still here"`)
	if got := ws.readText(); got != `"still here"` {
		t.Errorf("got %s", got)
	}
	ws.sendText(`{"up":"too"}`)
	select {
	case m := <-up:
		if string(m) != `{"up":"too"}` {
			t.Errorf("up got %s", m)
		}
	case <-time.After(5 * time.Second):
		t.Error("the WebSocket no longer forwards up")
	}
}

// A client that gives up while its handshake waits for Redis is counted as
// aborted, logged at debug, and leaves no subscription and no slot.
func TestAbortedHandshakeIsNotARedisFailure(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "AUTH_TIMEOUT_SECS=0.5")
	id, token := r.session(t)
	abort := func(waitFor func() bool) {
		t.Helper()
		nc, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(nc, "GET /agent/ws/%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n", id, token)
		eventually(t, "handshake waiting on Redis", waitFor)
		nc.Close()
	}
	fake.HoldSubscribes(true) // waiting for the subscription
	abort(func() bool { return fake.Subscribers("session:"+id+":down") == 1 })
	eventually(t, "abort counted", func() bool { return tp.metric(t, `wsproxy_connections_total{result="aborted"}`) == 1 })
	fake.HoldSubscribes(false)
	fake.Freeze(true) // waiting for the token lookup
	abort(func() bool { return goroutinesIn("wsproxy.(*proxy).checkRedisToken") == 1 })
	eventually(t, "second abort counted", func() bool { return tp.metric(t, `wsproxy_connections_total{result="aborted"}`) == 2 })
	fake.Freeze(false)

	eventually(t, "no subscription left", func() bool { return len(sessionChannels(fake)) == 0 })
	eventually(t, "no slot held", func() bool { return tp.p.slots.Load() == 0 })
	for _, result := range []string{"unavailable", "timeout"} {
		if got := tp.metric(t, `wsproxy_connections_total{result="`+result+`"}`); got != 0 {
			t.Errorf("%s counted %v times", result, got)
		}
	}
	for _, line := range strings.Split(tp.logs.String(), "\n") {
		if strings.Contains(line, "aborted") && !strings.Contains(line, `"level":"DEBUG"`) {
			t.Errorf("an abort logged above debug: %s", line)
		}
	}
	if !strings.Contains(tp.logs.String(), "handshake aborted") {
		t.Error("no debug record of the abort")
	}
}

// RFC 6455 §5.2: a 64-bit length with its top bit set fails the connection
// with 1002 and nothing is published; a length just below 2^63 is read (and
// discarded) without overflowing the size arithmetic.
func TestFrameLengthWithTopBitCloses1002(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	up := r.subscribeUp(t, id)
	c := tp.connect(t, id, token)
	payload := []byte(`{"a":1}`)
	for i := range payload {
		payload[i] ^= byte(i%4 + 1)
	}
	c.conn.Write(append(clientFrameHeader(true, opText, 1<<63|uint64(len(payload))), payload...))
	if code, _ := c.expectClose(5 * time.Second); code != 1002 {
		t.Errorf("close %d, want 1002", code)
	}

	c = tp.connect(t, id, token)
	c.writeFrame(false, opText, []byte(`{"a":`))
	c.conn.Write(append(clientFrameHeader(true, opContinuation, 1<<63-1), make([]byte, 4096)...))
	if f, err := c.readFrame(300 * time.Millisecond); err == nil {
		t.Errorf("a huge claim was answered with opcode %d %q", f.op, f.payload)
	}
	select {
	case m := <-up:
		t.Errorf("published %q", m)
	case <-time.After(200 * time.Millisecond):
	}
	// The proxy goes on serving everyone else.
	other := tp.connect(t, id, token)
	r.publish(t, id, `"fine"`)
	if got := other.readText(); got != `"fine"` {
		t.Errorf("got %s", got)
	}
}

// RFC 6455 §8.1: a text message that is not UTF-8, whole or across
// fragments, or a close reason that is not, fails the connection with 1007;
// nothing is published. UTF-8 that is not JSON is only a control error, and
// a character split between fragments is fine.
func TestInvalidUTF8Closes1007(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	up := r.subscribeUp(t, id)

	c := tp.connect(t, id, token)
	c.sendText("not json")
	if code := c.controlError(); code != "invalid_json" {
		t.Errorf("valid UTF-8, not JSON: %s", code)
	}
	c.writeFrame(false, opText, []byte(`"split `+"\xc3"))
	c.writeFrame(true, opContinuation, []byte("\xbc"+`"`))
	select {
	case m := <-up:
		if string(m) != `"split ü"` {
			t.Errorf("got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a character split between fragments was not published")
	}
	for name, frames := range map[string][][]byte{
		"whole message":    {[]byte("\"\xff\"")},
		"across fragments": {[]byte(`"ok so far`), []byte("\xed\xa0\x80\"")}, // a surrogate
	} {
		c := tp.connect(t, id, token)
		for i, f := range frames {
			op := byte(opText)
			if i > 0 {
				op = opContinuation
			}
			c.writeFrame(i == len(frames)-1, op, f)
		}
		if code, _ := c.expectClose(5 * time.Second); code != 1007 {
			t.Errorf("%s: close %d, want 1007", name, code)
		}
	}
	c = tp.connect(t, id, token)
	c.writeFrame(true, opClose, append(binary.BigEndian.AppendUint16(nil, 1000), 0xff))
	if code, _ := c.expectClose(5 * time.Second); code != 1007 {
		t.Errorf("close reason not UTF-8: answered %d, want 1007", code)
	}
	select {
	case m := <-up:
		t.Errorf("published %q", m)
	case <-time.After(200 * time.Millisecond):
	}
}

// RFC 6455 §4.4: a refused version is answered with the one spoken.
func TestUnsupportedVersionAnswersVersion13(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	_, res := tp.dial(t, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}, "Sec-Websocket-Version": {"8"}})
	if res.status != 400 || res.code != "bad_request" || res.header.Get("Sec-WebSocket-Version") != "13" {
		t.Errorf("version 8: %d %s, Sec-WebSocket-Version %q", res.status, res.body, res.header.Get("Sec-WebSocket-Version"))
	}
}

// RFC 7235 §2.1: the authentication scheme is case-insensitive.
func TestAuthorizationSchemeIsCaseInsensitive(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	for _, scheme := range []string{"bearer", "BEARER", "Bearer"} {
		c, res := tp.dial(t, "/agent/ws/"+id, http.Header{"Authorization": {scheme + " " + token}})
		if c == nil {
			t.Errorf("%s: %d %s", scheme, res.status, res.body)
			continue
		}
		c.conn.Close()
	}
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
	if err != nil || f.op != opPing {
		t.Fatalf("want a ping: %v, opcode %d", err, f.op)
	}
	if after := time.Since(opened); after < 600*time.Millisecond {
		t.Errorf("first ping %v after the open, want one interval (800 ms)", after)
	}
}

// MAX_TOTAL_BUFFER_BYTES bounds what all queues hold together: clients that
// fall behind are closed with 1008, the one that keeps up gets every
// message in order, and neither the total nor the heap runs past the bound.
func TestTotalBufferBound(t *testing.T) {
	const bound, size = 2 << 20, 8 << 10
	r := newTestRedis(t)
	tp := startProxy(t, r, "MAX_BUFFER_SIZE_BYTES=1048576", "MAX_TOTAL_BUFFER_BYTES="+strconv.Itoa(bound))
	id, token := r.session(t)
	var slow []*wsClient
	for i := 0; i < 10; i++ {
		c, res, err := tryDialWith(smallBuffer, tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
		if c == nil {
			t.Fatalf("slow client: %d %v", res.status, err)
		}
		c.t = t
		defer c.conn.Close()
		slow = append(slow, c)
	}
	fast := tp.connect(t, id, token)
	before, peakHeap, peakQueued := liveHeap(), int64(0), int64(0)
	pad := strings.Repeat("p", size)
	closes := func() float64 {
		return tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`) + tp.metric(t, `wsproxy_slow_client_closes_total{limit="connection"}`)
	}
	for i := 0; closes() < float64(len(slow)); i++ {
		if i == 5000 {
			t.Fatalf("40 MB published and %v of %d slow clients closed", closes(), len(slow))
		}
		message := fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, i, pad)
		r.publish(t, id, message)
		if got := fast.readText(); got != message {
			t.Fatalf("fast client: message %d is %.30q", i, got)
		}
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
	if got := tp.metric(t, `wsproxy_slow_client_closes_total{limit="total"}`); got == 0 {
		t.Error("no close counted against the total")
	}
	for i, c := range slow {
		if code, reason := c.expectClose(10 * time.Second); code != 1008 || reason != "client too slow" {
			t.Errorf("slow client %d: %d %q", i, code, reason)
		}
	}
	if !strings.Contains(tp.logs.String(), `"limit":"total"`) {
		t.Error("no log of a close against the total")
	}
	eventually(t, "queues empty", func() bool { return tp.metric(t, "wsproxy_queued_bytes") == 0 })
}

// ---------------------------------------------------------------------------
// Refusals a browser can read: with an Origin header, a refused handshake is
// completed and closed at once with 4000 + status, the code as the reason.

// refusedWith dials path with header, which carries an Origin, and returns
// the close code and reason of the completed-then-refused handshake; it
// fails the test on an HTTP answer, or if the proxy does not close the TCP
// connection after the close handshake.
func refusedWith(t *testing.T, tp *testProxy, path string, header http.Header) (int, string) {
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
	return closeCode(f.payload), string(f.payload[2:])
}

func TestBrowserRefusalsAreCloseCodes(t *testing.T) {
	r, fake := fakeTarget(t)
	tp := startProxy(t, r, "ALLOWED_ORIGINS=https://app.example.com", "MAX_CONNECTIONS=2", "SUBSCRIBE_TIMEOUT_SECS=0.3")
	id, token := r.session(t)
	browser := func(kv ...string) http.Header {
		h := http.Header{"Origin": {"https://app.example.com"}}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	for _, tc := range []struct {
		name   string
		path   string
		header http.Header
		code   int
		reason string
	}{
		{"bad session id", "/agent/ws/x*y", browser(), 4400, "bad_request"},
		{"origin beats a missing token", "/agent/ws/" + id, http.Header{"Origin": {"https://evil.example.com"}}, 4403, "origin_not_allowed"},
		{"missing token", "/agent/ws/" + id, browser(), 4401, "missing_token"},
		{"unknown session", "/agent/ws/nosuchsession?token=" + token, browser(), 4401, "unknown_session"},
		{"invalid token", "/agent/ws/" + id + "?token=wrong", browser(), 4403, "invalid_token"},
	} {
		if code, reason := refusedWith(t, tp, tc.path, tc.header); code != tc.code || reason != tc.reason {
			t.Errorf("%s: close %d %q, want %d %q", tc.name, code, reason, tc.code, tc.reason)
		}
	}
	// Not a valid upgrade: HTTP 400 whatever the Origin, naming the version.
	_, res := tp.dial(t, "/agent/ws/"+id, browser("Sec-WebSocket-Version", "8"))
	if res.status != 400 || res.code != "bad_request" || res.header.Get("Sec-WebSocket-Version") != "13" {
		t.Errorf("version 8 from a browser: %d %s", res.status, res.body)
	}
	fake.HoldSubscribes(true)
	if code, reason := refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser()); code != 4504 || reason != "subscribe_timeout" {
		t.Errorf("withheld confirmation: close %d %q", code, reason)
	}
	fake.HoldSubscribes(false)
	tp.connect(t, id, token)
	tp.connect(t, id, token)
	if code, reason := refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser()); code != 4503 || reason != "too_many_connections" {
		t.Errorf("at MAX_CONNECTIONS: close %d %q", code, reason)
	}
	// Counted and logged as the HTTP refusals are; nothing stays subscribed.
	for result, want := range map[string]float64{"bad_request": 2, "unauthorized": 2, "forbidden": 2, "timeout": 1, "rejected": 1} {
		if got := tp.metric(t, `wsproxy_connections_total{result="`+result+`"}`); got != want {
			t.Errorf("%s counted %v times, want %v", result, got, want)
		}
	}
	if n := strings.Count(tp.logs.String(), `"msg":"handshake refused"`); n != 8 {
		t.Errorf("%d refusals logged, want 8", n)
	}
	r.waitNumSub(t, "session:"+id+":down", 1) // the two open connections
	tp.p.draining.Store(true)
	if code, reason := refusedWith(t, tp, "/agent/ws/"+id+"?token="+token, browser()); code != 4503 || reason != "draining" {
		t.Errorf("draining: close %d %q", code, reason)
	}
}

// Redis down, as a browser sees it.
func TestBrowserRefusalWhenRedisIsDown(t *testing.T) {
	tp := startProxy(t, &testRedis{url: "redis://127.0.0.1:1"}, "AUTH_MODE=none")
	if code, reason := refusedWith(t, tp, "/agent/ws/s", http.Header{"Origin": {"http://localhost"}}); code != 4503 || reason != "redis_unavailable" {
		t.Errorf("close %d %q, want 4503 redis_unavailable", code, reason)
	}
}

// ---------------------------------------------------------------------------
// The write path: a frame goes to the socket straight from send when
// nothing is queued, and the writer takes over only what the kernel refused.

// connOf returns the proxy's one open connection of a session.
func connOf(t *testing.T, tp *testProxy, sessionID string) *conn {
	t.Helper()
	var c *conn
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

// A frame the kernel takes only part of (the client's receive buffer is
// tiny and it is not reading) is finished by the writer, and every message
// before and after arrives whole and in publish order, whichever path wrote
// it.
func TestPartialWriteContinuesInOrder(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	id, token := r.session(t)
	client, res, err := tryDialWith(smallBuffer, tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
	if client == nil {
		t.Fatalf("%d %v", res.status, err)
	}
	client.t = t
	defer client.conn.Close()
	c := connOf(t, tp, id)

	var want []string
	publish := func(m string) { r.publish(t, id, m); want = append(want, m) }
	publish(`{"seq":0}`) // written directly
	if got := client.readText(); got != want[0] {
		t.Fatalf("got %s", got)
	}
	big := `"` + strings.Repeat("b", 60000) + `"` // more than the socket takes at once
	for i := 1; ; i++ {
		publish(fmt.Sprintf(`{"seq":%d,"pad":%s}`, i, big))
		c.mu.Lock()
		partial := len(c.queue) > 0 && c.queue[0].sent > 0
		writing := c.writing
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
	for i, w := range want[1:] {
		if got := client.readText(); got != w {
			t.Fatalf("message %d: got %.40q, want %.40q", i+1, got, w)
		}
	}
	eventually(t, "the writer done", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return !c.writing })
	publish(`{"seq":"direct again"}`)
	if got := client.readText(); got != want[len(want)-1] {
		t.Errorf("got %s", got)
	}
	eventually(t, "nothing queued", func() bool { return tp.p.metrics.queuedBytes.Load() == 0 })
}

// A close queued right after a direct write, or behind a partial one, goes
// out after the data, and last.
func TestCloseGoesOutAfterDirectWrites(t *testing.T) {
	r := newTestRedis(t)
	tp := startProxy(t, r)
	for _, partial := range []bool{false, true} {
		id, token := r.session(t)
		client, res, err := tryDialWith(smallBuffer, tp.addr, "/agent/ws/"+id, http.Header{"Authorization": {"Bearer " + token}}, true)
		if client == nil {
			t.Fatalf("%d %v", res.status, err)
		}
		client.t = t
		defer client.conn.Close()
		c := connOf(t, tp, id)
		// Small frames go out whole; 60 kB ones until the kernel refuses part of one.
		var messages []string
		for queued := false; !queued; {
			if len(messages) == 200 {
				t.Fatal("the socket never refused a byte")
			}
			m := `"` + strings.Repeat("d", 100) + `"`
			if partial {
				m = `"` + strings.Repeat("d", 60000) + `"`
			}
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
		for i, m := range messages {
			if got := client.readText(); got != m {
				t.Errorf("partial %v: message %d is %.30q", partial, i, got)
			}
		}
		if code, reason := client.expectClose(5 * time.Second); code != 1000 || reason != "bye" {
			t.Errorf("partial %v: close %d %q", partial, code, reason)
		}
	}
}
