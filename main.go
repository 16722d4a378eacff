// Command wsproxy holds browser WebSocket connections on behalf of stateless
// workers that only talk to Redis.
//
//	browser ──WebSocket──▶ wsproxy ──PUBLISH session:{id}:up──────▶ Redis ──▶ worker
//	browser ◀──WebSocket── wsproxy ◀──SUBSCRIBE session:{id}:down── Redis ◀── worker PUBLISH
//
// Clients connect to /{agent_id}/ws/{session_id}. Before answering 101 the
// proxy authenticates the client (the token stored at session:{id}:auth, a
// JWT, or nothing) and subscribes to session:{id}:down, so nothing a worker
// publishes after the client's onopen is lost. One Redis connection receives
// for every session; a pool of others serves GET, EXPIRE, DEL and PUBLISH.
//
// The file reads top to bottom: configuration, main, the handshake, the
// connection (its reader, then its writer), the hub that owns the Redis
// subscription, metrics, small helpers. README.md is the contract; comments
// cite its sections as "README: <section>".
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/gomodule/redigo/redis"
	"golang.org/x/net/websocket"
)

// Timing and sizes that are not configurable, and how they relate.
const (
	// closeWait is how long a closing connection waits for the client's
	// close frame after sending its own (RFC 6455 §7.1.1).
	closeWait = 2 * time.Second
	// The subscriber sends PING every redisPingPeriod and gives up on a
	// connection that has said nothing for redisReadTimeout: longer than
	// the period, so a slow reply is not taken for a dead connection.
	redisPingPeriod  = 2 * time.Second
	redisReadTimeout = redisPingPeriod + 3*time.Second
	// redisCommandTimeout bounds PUBLISH, EXPIRE and the subscriber's dial.
	redisCommandTimeout = 5 * time.Second
	// Reconnect backoff doubles from reconnectMin up to reconnectMax, with
	// jitter so that many instances do not hammer a recovering Redis together.
	reconnectMin = 100 * time.Millisecond
	reconnectMax = 5 * time.Second
	// healthTimeout: /health answers 503 when Redis does not PONG in time.
	healthTimeout = time.Second
	// maxWrite is about what one write system call sends to a client.
	maxWrite = 64 << 10
	// readChunk is the most one read of a frame's payload takes.
	readChunk = 32 << 10
	// readBuffer is the size of a connection's read buffer: client messages
	// are mostly small, and a larger one is read in chunks past it.
	readBuffer = 512
	// sendBuffer bounds the kernel's send buffer of a client socket (Linux
	// doubles it): what a stalled client holds outside wsproxy's own queue
	// bounds, and what a slow one must drain for the writer to see progress.
	sendBuffer = 128 << 10
	// frameOverhead is what holding a queued frame costs besides its
	// payload; it counts against the queue bounds, so that a flood of empty
	// frames (pongs) is bounded too.
	frameOverhead = 64
	// queueKeep is the most frames a drained queue's array keeps for the
	// next ones: a connection that was once far behind does not hold the
	// array it grew then.
	queueKeep = 64
	// keepaliveChannel is subscribed by every instance and published to by
	// none: it keeps the subscriber in subscribed mode even with no client,
	// where Redis answers PING in a form PubSubConn parses.
	keepaliveChannel = "wsproxy:keepalive"
	// fileReserve is the file descriptors wsproxy needs besides its
	// WebSockets: the listener, Redis, health checks and metrics scrapes.
	fileReserve = 100
)

// Timeouts that are variables only so that tests can shorten them. Plain
// HTTP requests (health checks, metrics, handshakes) must arrive within
// httpRequestTimeout, and an idle keep-alive connection is closed after
// httpIdleTimeout. An upgraded WebSocket clears these deadlines: liveness
// and writeWait rule it.
var (
	httpRequestTimeout = 10 * time.Second
	httpIdleTimeout    = 60 * time.Second
	// writeWait bounds how long the writer waits for a socket that takes
	// nothing: a client whose kernel buffer (sendBuffer) stays full for
	// this long is gone, whatever its queue holds.
	writeWait = 10 * time.Second
)

// ---------------------------------------------------------------------------
// Configuration (README: Configuration)

// config is every setting, read once at start-up by loadConfig.
type config struct {
	Host             string        // HOST, default 0.0.0.0
	Port             int           // PORT, default 8080
	RedisURL         string        // REDIS_URL, default redis://127.0.0.1:6379
	PingInterval     time.Duration // WS_PING_INTERVAL_SECS, default 30
	PingTimeout      time.Duration // WS_PING_TIMEOUT_SECS, default 10
	ShutdownGrace    time.Duration // SHUTDOWN_GRACE_PERIOD_SECS, default 30
	AuthMode         string        // AUTH_MODE: redis (default), jwt or none
	AuthTimeout      time.Duration // AUTH_TIMEOUT_SECS, default 5
	AuthGrace        time.Duration // AUTH_GRACE_PERIOD_SECS, default 10800; 0 = single-use token
	JWTSecret        string        // JWT_SECRET, at least 32 bytes in jwt mode
	SubscribeTimeout time.Duration // SUBSCRIBE_TIMEOUT_SECS, default 5
	MaxConnections   int           // MAX_CONNECTIONS, default 50000
	MaxMessageSize   int           // MAX_MESSAGE_SIZE_BYTES, default 1 MiB
	MaxBufferSize    int           // MAX_BUFFER_SIZE_BYTES, default 10 MiB
	MaxTotalBuffer   int           // MAX_TOTAL_BUFFER_BYTES, default 128 MiB; at least MaxBufferSize
	IdleTimeout      time.Duration // IDLE_TIMEOUT_SECS, default 0 (off)
	StreamEndTimeout time.Duration // STREAM_END_TIMEOUT_SECS, default 60; 0 = off
	UpstreamEnabled  bool          // UPSTREAM_ENABLED, default true
	AllowedOrigins   []string      // ALLOWED_ORIGINS, comma-separated; empty = any
	LogLevel         slog.Level    // LOG_LEVEL: debug, info (default), warn, error
	LogFormat        string        // LOG_FORMAT: json (default) or text

	effective []slog.Attr // each variable as read, secrets redacted: the start-up log
}

// loadConfig reads every variable through getenv and returns the first
// malformed one as an error that names it.
func loadConfig(getenv func(string) string) (*config, error) {
	l := &loader{getenv: getenv}
	c := &config{
		Host:             l.str("HOST", "0.0.0.0"),
		Port:             l.integer("PORT", 8080, 1, 65535),
		RedisURL:         l.str("REDIS_URL", "redis://127.0.0.1:6379"),
		PingInterval:     l.seconds("WS_PING_INTERVAL_SECS", 30, false),
		PingTimeout:      l.seconds("WS_PING_TIMEOUT_SECS", 10, false),
		ShutdownGrace:    l.seconds("SHUTDOWN_GRACE_PERIOD_SECS", 30, true),
		AuthMode:         l.oneOf("AUTH_MODE", "redis", "jwt", "none"),
		AuthTimeout:      l.seconds("AUTH_TIMEOUT_SECS", 5, false),
		AuthGrace:        l.seconds("AUTH_GRACE_PERIOD_SECS", 10800, true),
		JWTSecret:        l.str("JWT_SECRET", ""),
		SubscribeTimeout: l.seconds("SUBSCRIBE_TIMEOUT_SECS", 5, false),
		MaxConnections:   l.integer("MAX_CONNECTIONS", 50000, 1, math.MaxInt32),
		MaxMessageSize:   l.integer("MAX_MESSAGE_SIZE_BYTES", 1<<20, 1, math.MaxInt32),
		MaxBufferSize:    l.integer("MAX_BUFFER_SIZE_BYTES", 10<<20, 1, math.MaxInt32),
		MaxTotalBuffer:   l.integer("MAX_TOTAL_BUFFER_BYTES", 128<<20, 1, math.MaxInt),
		IdleTimeout:      l.seconds("IDLE_TIMEOUT_SECS", 0, true),
		StreamEndTimeout: l.seconds("STREAM_END_TIMEOUT_SECS", 60, true),
		UpstreamEnabled:  l.oneOf("UPSTREAM_ENABLED", "true", "false") == "true",
		LogFormat:        l.oneOf("LOG_FORMAT", "json", "text"),
	}
	c.LogLevel.UnmarshalText([]byte(l.oneOf("LOG_LEVEL", "info", "debug", "warn", "error")))
	for _, o := range strings.Split(l.str("ALLOWED_ORIGINS", ""), ",") {
		if o = strings.TrimSpace(o); o != "" {
			c.AllowedOrigins = append(c.AllowedOrigins, strings.TrimSuffix(o, "/"))
		}
	}
	switch u, err := url.Parse(c.RedisURL); {
	case err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "":
		l.fail("REDIS_URL", "must be a redis:// or rediss:// URL with a host") // it may hold a password: not repeated
	case u.User != nil:
		u.User = url.UserPassword(u.User.Username(), "REDACTED")
		l.redact("REDIS_URL", u.String())
	}
	if c.JWTSecret != "" {
		l.redact("JWT_SECRET", "REDACTED")
	}
	if c.AuthMode == "jwt" && len(c.JWTSecret) < 32 {
		l.fail("JWT_SECRET", "must be at least 32 bytes when AUTH_MODE=jwt")
	}
	if c.MaxTotalBuffer < c.MaxBufferSize {
		l.fail("MAX_TOTAL_BUFFER_BYTES", "must be at least MAX_BUFFER_SIZE_BYTES (%d), got %d", c.MaxBufferSize, c.MaxTotalBuffer)
	}
	c.effective = l.effective
	return c, l.err
}

// loader reads variables for loadConfig, keeping the first malformed one
// and the effective value of each.
type loader struct {
	getenv    func(string) string
	err       error
	effective []slog.Attr
}

func (l *loader) fail(name, format string, args ...any) {
	if l.err == nil {
		l.err = fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...))
	}
}

func (l *loader) str(name, def string) string {
	v := strings.TrimSpace(l.getenv(name))
	if v == "" {
		v = def
	}
	l.effective = append(l.effective, slog.String(name, v))
	return v
}

func (l *loader) redact(name, v string) {
	l.effective[slices.IndexFunc(l.effective, func(a slog.Attr) bool { return a.Key == name })].Value = slog.StringValue(v)
}

func (l *loader) oneOf(name string, def string, others ...string) string {
	v := l.str(name, def)
	if v != def && !slices.Contains(others, v) {
		l.fail(name, "must be %s, got %q", strings.Join(append([]string{def}, others...), ", "), v)
	}
	return v
}

func (l *loader) integer(name string, def, min, max int) int {
	v := l.str(name, strconv.Itoa(def))
	n, err := strconv.Atoi(v)
	if err != nil || n < min || n > max {
		l.fail(name, "must be a whole number from %d to %d, got %q", min, max, v)
	}
	return n
}

// seconds reads a duration in seconds, which may be fractional ("0.5").
func (l *loader) seconds(name string, def float64, allowZero bool) time.Duration {
	v := l.str(name, strconv.FormatFloat(def, 'f', -1, 64))
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > 1e9 || (f == 0 && !allowZero) {
		l.fail(name, "must be %s, got %q", map[bool]string{false: "a positive number of seconds", true: "a number of seconds, 0 or more"}[allowZero], v)
	}
	return time.Duration(f * float64(time.Second))
}

// LogValue is the configuration as the start-up log shows it: a JSON
// object of the variables, by the names the environment uses.
func (c *config) LogValue() slog.Value { return slog.GroupValue(c.effective...) }

// reads reports whether name is a variable wsproxy reads.
func (c *config) reads(name string) bool {
	return slices.ContainsFunc(c.effective, func(a slog.Attr) bool { return a.Key == name })
}

// readDotEnv returns the KEY=VALUE lines of a .env file, if there is one.
// A # starts a comment only at the start of a line.
func readDotEnv(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	file := map[string]string{}
	for i, line := range strings.Split(strings.TrimPrefix(string(data), "\ufeff"), "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if !ok {
			return nil, fmt.Errorf("%s line %d: want KEY=VALUE", path, i+1)
		}
		value = strings.TrimSpace(value)
		if len(value) >= 2 && (value[0] == '"' || value[0] == '\'') && value[len(value)-1] == value[0] {
			value = value[1 : len(value)-1]
		}
		file[strings.TrimSpace(key)] = value
	}
	return file, nil
}

// environment looks a variable up in the real environment, then in .env.
func environment(dotenv map[string]string) func(string) string {
	return func(name string) string {
		if v, ok := os.LookupEnv(name); ok {
			return v
		}
		return dotenv[name]
	}
}

// ---------------------------------------------------------------------------
// main

func main() {
	dotenv, err := readDotEnv(".env")
	var cfg *config
	if err == nil {
		cfg, err = loadConfig(environment(dotenv))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wsproxy:", err)
		os.Exit(2)
	}
	log := newLogger(cfg, os.Stdout)
	for _, key := range slices.Sorted(maps.Keys(dotenv)) {
		if !cfg.reads(key) {
			log.Warn(".env sets a variable wsproxy does not read; check its spelling", "variable", key)
		}
	}
	var files syscall.Rlimit // Go has raised the soft limit to the hard one
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &files) == nil && files.Cur < uint64(cfg.MaxConnections)+fileReserve {
		log.Warn("MAX_CONNECTIONS is above what the open-file limit allows: raise the limit (ulimit -n) or lower MAX_CONNECTIONS",
			"variable", "MAX_CONNECTIONS", "max_connections", cfg.MaxConnections, "open_file_limit", files.Cur)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "wsproxy:", err)
		os.Exit(1)
	}
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	if err := newProxy(cfg, log).run(ln, signals); err != nil {
		log.Error("server failed", "err", err)
		os.Exit(1)
	}
}

func newLogger(cfg *config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// proxy is the whole service: the HTTP side, the hub, and the Redis pool.
type proxy struct {
	cfg      *config
	log      *slog.Logger
	mux      *http.ServeMux
	pool     *redis.Pool // GET, EXPIRE, DEL, PUBLISH and the health PING
	hub      *hub
	metrics  *metrics
	draining atomic.Bool
	slots    atomic.Int64  // connections open or in their handshake (refusals too), for MAX_CONNECTIONS
	nextID   atomic.Uint64 // connection ids for logs
	released chan struct{} // poked whenever a slot is released, for drain
}

func newProxy(cfg *config, log *slog.Logger) *proxy {
	p := &proxy{cfg: cfg, log: log, mux: http.NewServeMux(), metrics: newMetrics(), released: make(chan struct{}, 1)}
	p.hub = &hub{cfg: cfg, log: log, metrics: p.metrics, channels: map[string][]*conn{}, waiting: map[string][]chan<- error{}}
	p.pool = &redis.Pool{
		// Bounded, so that a burst of handshakes or disconnects queues for
		// a connection instead of opening thousands of them to Redis.
		MaxActive: 128, MaxIdle: 128, Wait: true, IdleTimeout: time.Minute,
		DialContext: func(ctx context.Context) (redis.Conn, error) { return dialRedis(ctx, cfg) },
		// A connection that sat idle, or that predates a lost subscriber,
		// may have died with Redis: check it before use, but only then, to
		// keep PUBLISH one round trip.
		TestOnBorrowContext: func(ctx context.Context, c redis.Conn, lastUsed time.Time) error {
			if time.Since(lastUsed) < time.Second && lastUsed.UnixNano() > p.hub.lostAt.Load() {
				return nil
			}
			_, err := redis.DoContext(c, ctx, "PING")
			return err
		},
	}
	p.mux.HandleFunc("/{agent}/ws/{session}", p.handleWebSocket)
	p.mux.HandleFunc("/health", getOnly(p.handleHealth))
	p.mux.HandleFunc("/ready", getOnly(p.handleReady))
	p.mux.HandleFunc("/metrics", getOnly(p.metrics.handle))
	p.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody("not_found", "no such endpoint"))
	})
	return p
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) { p.mux.ServeHTTP(w, r) }

// run serves on ln until a signal arrives, then drains and returns
// (README: Operations, Shutdown).
func (p *proxy) run(ln net.Listener, signals <-chan os.Signal) error {
	p.log.Info("starting", "addr", ln.Addr().String(), "config", p.cfg)
	if p.cfg.AuthMode == "none" {
		p.log.Warn("AUTH_MODE=none: every client is accepted without a token; use it for local development only")
	}
	ctx, stop := context.WithCancel(context.Background())
	var background sync.WaitGroup // the hub and the sweeper, which end with ctx
	background.Go(func() { p.hub.run(ctx) })
	background.Go(func() { p.sweepLoop(ctx) })
	defer func() {
		stop()
		background.Wait()
		p.pool.Close()
		p.log.Info("stopped")
	}()

	srv := &http.Server{Handler: p, ReadTimeout: httpRequestTimeout, IdleTimeout: httpIdleTimeout, MaxHeaderBytes: 32 << 10,
		WriteTimeout: httpRequestTimeout + p.cfg.AuthTimeout + p.cfg.SubscribeTimeout, // a handshake waits for Redis before its 101
		ErrorLog:     slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }() // ends with Shutdown below
	select {
	case err := <-served:
		return err
	case s := <-signals:
		p.log.Info("shutdown signal received", "signal", s.String())
	}
	p.drain(signals)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	srv.Shutdown(shutdownCtx) // hijacked WebSockets are not its business; they are closed already
	return nil
}

// drain refuses new connections and lets open ones run until they end or
// SHUTDOWN_GRACE_PERIOD_SECS passes, then closes them with 1001 after their
// queues are written. A second signal closes them at once.
func (p *proxy) drain(signals <-chan os.Signal) {
	p.draining.Store(true)
	deadline := time.Now().Add(p.cfg.ShutdownGrace)
	progress := func() {
		p.log.Info("draining", "connections", p.metrics.active.Load(), "deadline", deadline.Format(time.RFC3339Nano))
	}
	progress()
	grace, ticker := time.NewTimer(p.cfg.ShutdownGrace), time.NewTicker(5*time.Second)
	defer grace.Stop()
	defer ticker.Stop()
	var giveUp <-chan time.Time // set once the close frames are on their way
	for p.slots.Load() > 0 {
		select {
		case <-p.released:
		case <-ticker.C:
			progress()
		case <-grace.C:
			p.log.Info("grace period over: closing connections with 1001", "connections", p.metrics.active.Load())
			for _, c := range p.hub.conns(nil) {
				c.closeWith(1001, "server shutting down", false)
			}
			giveUp = time.After(writeWait + closeWait)
		case s := <-signals:
			p.log.Info("second signal: closing connections with 1001 now", "signal", s.String(), "connections", p.metrics.active.Load())
			for _, c := range p.hub.conns(nil) {
				c.closeWith(1001, "server shutting down", true)
			}
			giveUp = time.After(closeWait + time.Second)
		case <-giveUp:
			p.log.Warn("connections still open at exit", "connections", p.slots.Load())
			return
		}
	}
}

// releaseSlot ends a handshake or a connection, and wakes drain.
func (p *proxy) releaseSlot() {
	p.slots.Add(-1)
	select {
	case p.released <- struct{}{}:
	default:
	}
}

// sweepLoop is the one timer of all connections: pings (liveness), and the
// idle and stream-end timeouts. One goroutine instead of a ticker per
// connection keeps an idle connection down to its socket and reader.
func (p *proxy) sweepLoop(ctx context.Context) {
	period := p.cfg.PingInterval
	for _, d := range []time.Duration{p.cfg.IdleTimeout, p.cfg.StreamEndTimeout, p.cfg.AuthGrace / 2} {
		if d > 0 && d < period {
			period = d
		}
	}
	ticker := time.NewTicker(min(max(period/10, 10*time.Millisecond), time.Second))
	defer ticker.Stop()
	var conns []*conn
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-ticker.C:
			conns = p.hub.conns(conns)
			refresh := map[string]bool{}
			for _, c := range conns {
				if c.sweep(now) {
					refresh[c.sessionID] = true
				}
			}
			clear(conns) // hold no connection until the next tick
			if len(refresh) > 0 {
				p.refreshTokens(slices.Collect(maps.Keys(refresh))...)
			}
		}
	}
}

func (p *proxy) handleHealth(w http.ResponseWriter, r *http.Request) {
	status, body := http.StatusOK, map[string]any{"status": "healthy", "redis": "connected"}
	if !p.hub.connected() || p.pingRedis() != nil {
		status, body = http.StatusServiceUnavailable, map[string]any{"status": "unhealthy", "redis": "disconnected"}
	}
	body["active_connections"] = p.metrics.active.Load()
	writeJSON(w, status, body)
}

func (p *proxy) pingRedis() error {
	ctx, cancel := context.WithTimeout(context.Background(), healthTimeout)
	defer cancel()
	c, err := p.pool.GetContext(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = redis.DoWithTimeout(c, healthTimeout, "PING")
	return err
}

func (p *proxy) handleReady(w http.ResponseWriter, r *http.Request) {
	switch {
	case p.draining.Load():
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "draining"})
	case !p.hub.connected():
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "redis_unavailable"})
	default:
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	}
}

// ---------------------------------------------------------------------------
// The handshake (README: Handshake, Authentication)

// handshakeError is a refusal before 101.
type handshakeError struct {
	status        int
	code, message string
}

// handleWebSocket makes every check, subscribes, and only then lets
// x/net/websocket answer 101. The checks are made here rather than in
// websocket.Server.Handshake, which can only answer 403.
func (p *proxy) handleWebSocket(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		writeJSON(w, http.StatusMethodNotAllowed, errorBody("method_not_allowed", "use GET"))
		return
	}
	p.slots.Add(1) // until the handshake fails, or serve ends
	c, herr := p.handshake(r)
	if herr != nil {
		p.refuse(w, r, herr)
		p.releaseSlot()
		return
	}
	netConn, reader := upgrade(w, r)
	if netConn == nil { // isUpgrade checks what x/net/websocket does: the 101 could not be sent
		c.abandon()
		p.releaseSlot()
		p.metrics.connections["aborted"].Add(1)
		p.log.Debug("handshake aborted by the client", "agent_id", c.agentID, "session_id", c.sessionID, "remote", c.remote)
		return
	}
	c.attach(netConn, reader)
	// serve runs on a goroutine of its own, so that this handler returns
	// and net/http frees what it holds for the request (buffers, a stack
	// grown deep): a few KiB on every open connection.
	go c.serve()
}

// handshake makes the checks in their order. On success the connection has
// its own confirmed subscription.
func (p *proxy) handshake(r *http.Request) (*conn, *handshakeError) {
	agentID, sessionID := r.PathValue("agent"), r.PathValue("session")
	if !validID(agentID) || !validID(sessionID) {
		return nil, &handshakeError{400, "bad_request", "agent_id and session_id must be 1-128 characters of A-Z a-z 0-9 . _ ~ -"}
	}
	if p.draining.Load() {
		return nil, &handshakeError{503, "draining", "the server is shutting down; reconnect to another instance"}
	}
	if p.slots.Load() > int64(p.cfg.MaxConnections) {
		return nil, &handshakeError{503, "too_many_connections", "the server is at MAX_CONNECTIONS"}
	}
	if herr := p.authorize(r, sessionID); herr != nil {
		return nil, herr
	}
	c := &conn{p: p, id: p.nextID.Add(1), agentID: agentID, sessionID: sessionID,
		channel: "session:" + sessionID + ":down", remote: r.RemoteAddr, opened: time.Now()}
	c.pingedAt, c.refreshedAt, c.lastData = c.opened, c.opened, c.opened.UnixNano() // the first ping goes out one interval after the open
	if herr := p.hub.join(r.Context(), c); herr != nil {
		return nil, herr
	}
	return c, nil
}

// authorize checks the upgrade, the origin and the token.
func (p *proxy) authorize(r *http.Request, sessionID string) *handshakeError {
	if !isUpgrade(r) {
		return &handshakeError{400, "bad_request", "not a WebSocket upgrade (RFC 6455 version 13)"}
	}
	// A request without Origin is no browser's, and origin checks cannot
	// protect against other clients: it goes on to authentication.
	if origin := r.Header.Get("Origin"); origin != "" && len(p.cfg.AllowedOrigins) > 0 && !slices.Contains(p.cfg.AllowedOrigins, origin) {
		return &handshakeError{403, "origin_not_allowed", "origin " + origin + " is not in ALLOWED_ORIGINS"}
	}
	if p.cfg.AuthMode == "none" {
		return nil
	}
	// The scheme is case-insensitive (RFC 7235 §2.1).
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if token = strings.TrimSpace(token); !strings.EqualFold(scheme, "Bearer") || token == "" {
		token = r.URL.Query().Get("token") // browsers cannot set headers on a WebSocket
	}
	switch {
	case token == "":
		return &handshakeError{401, "missing_token", "send Authorization: Bearer <token> or ?token=<token>"}
	case p.cfg.AuthMode == "jwt":
		return verifyJWT(token, []byte(p.cfg.JWTSecret), sessionID, time.Now())
	}
	return p.checkRedisToken(r.Context(), sessionID, token)
}

// isUpgrade reports whether r asks for a WebSocket (RFC 6455 §4.2.1),
// checked exactly as x/net/websocket checks it (strings.ToLower, not
// EqualFold, which takes U+017F for an s), so that the library never refuses
// a handshake that has been subscribed.
func isUpgrade(r *http.Request) bool {
	_, err := url.ParseRequestURI("ws://" + r.Host + r.URL.RequestURI())
	return strings.ToLower(r.Header.Get("Upgrade")) == "websocket" && strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") &&
		r.Header.Get("Sec-WebSocket-Key") != "" && r.Header.Get("Sec-WebSocket-Version") == "13" && err == nil
}

// checkRedisToken compares the token with session:{id}:auth, then keeps the
// key for AUTH_GRACE_PERIOD_SECS so the client can reconnect with it, or
// deletes it when the grace period is 0 (a single-use token).
func (p *proxy) checkRedisToken(ctx context.Context, sessionID, token string) *handshakeError {
	key := "session:" + sessionID + ":auth"
	deadline := time.Now().Add(p.cfg.AuthTimeout) // for the whole lookup, not each command
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	c, err := p.pool.GetContext(ctx)
	if err != nil {
		return redisHandshakeError(err)
	}
	defer c.Close()
	stored, err := redis.Bytes(redis.DoWithTimeout(c, time.Until(deadline), "GET", key))
	switch {
	case err == redis.ErrNil:
		return &handshakeError{401, "unknown_session", "no token is stored for this session"}
	case err != nil:
		return redisHandshakeError(err)
	case subtle.ConstantTimeCompare(stored, []byte(token)) != 1:
		return &handshakeError{403, "invalid_token", "the token does not match this session"}
	case p.cfg.AuthGrace > 0:
		_, err = redis.DoWithTimeout(c, time.Until(deadline), "EXPIRE", key, graceSeconds(p.cfg))
		return redisHandshakeError(err)
	}
	// Of two handshakes racing with a single-use token only one deletes it.
	if n, err := redis.Int(redis.DoWithTimeout(c, time.Until(deadline), "DEL", key)); err != nil || n == 0 {
		return cmp.Or(redisHandshakeError(err), &handshakeError{401, "unknown_session", "the single-use token was already used"})
	}
	return nil
}

// redisHandshakeError is how a Redis failure refuses a handshake; nil for nil.
func redisHandshakeError(err error) *handshakeError {
	var netErr net.Error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()):
		return &handshakeError{504, "auth_timeout", "Redis did not answer the token lookup in time"}
	}
	return &handshakeError{503, "redis_unavailable", "Redis is unavailable"}
}

// verifyJWT accepts an HS256 token (RFC 7519) whose session_id claim is the
// path's. Only HS256: accepting the header's alg is how "none" attacks work.
func verifyJWT(token string, secret []byte, sessionID string, now time.Time) *handshakeError {
	invalid := &handshakeError{403, "invalid_token", "the token is not a valid HS256 JWT for this server"}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return invalid
	}
	var header struct{ Alg string }
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(parts[0] + "." + parts[1]))
	signature, err := base64.RawURLEncoding.DecodeString(parts[2])
	if decodeJWTPart(parts[0], &header) != nil || header.Alg != "HS256" || err != nil || !hmac.Equal(signature, mac.Sum(nil)) {
		return invalid
	}
	var claims struct {
		SessionID string   `json:"session_id"`
		Exp       *float64 `json:"exp"`
		Nbf       *float64 `json:"nbf"`
	}
	unix := float64(now.UnixNano()) / 1e9
	switch {
	case decodeJWTPart(parts[1], &claims) != nil:
		return invalid
	case claims.SessionID != sessionID:
		return &handshakeError{403, "session_mismatch", "the token was issued for another session"}
	case claims.Exp != nil && unix >= *claims.Exp:
		return &handshakeError{403, "token_expired", "the token has expired"}
	case claims.Nbf != nil && unix < *claims.Nbf:
		return &handshakeError{403, "token_not_yet_valid", "the token is not valid yet"}
	}
	return nil
}

func decodeJWTPart(part string, v any) error {
	data, err := base64.RawURLEncoding.DecodeString(part)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, v)
}

// refuse answers a failed handshake, and counts and logs it; tokens are
// never logged. A browser cannot read the status of a refused handshake,
// only a close code: for a request with an Origin, the handshake is
// completed and closed at once with 4000 + status (README: Close codes).
// A client that left while its handshake waited gets no answer and counts
// as aborted, not as a failure of Redis.
func (p *proxy) refuse(w http.ResponseWriter, r *http.Request, e *handshakeError) {
	attrs := []any{"agent_id", r.PathValue("agent"), "session_id", r.PathValue("session"), "remote", r.RemoteAddr}
	if r.Context().Err() != nil {
		p.metrics.connections["aborted"].Add(1)
		p.log.Debug("handshake aborted by the client", attrs...)
		return
	}
	result := map[int]string{400: "bad_request", 401: "unauthorized", 403: "forbidden", 503: "unavailable", 504: "timeout"}[e.status]
	if e.code == "draining" || e.code == "too_many_connections" {
		result = "rejected"
	}
	p.metrics.connections[result].Add(1)
	level := map[bool]slog.Level{false: slog.LevelInfo, true: slog.LevelWarn}[e.status >= 500]
	p.log.Log(r.Context(), level, "handshake refused", append(attrs, "status", e.status, "code", e.code)...)
	switch {
	case r.Header.Get("Origin") != "" && isUpgrade(r):
		if netConn, _ := upgrade(w, r); netConn != nil {
			closeRefused(netConn, 4000+e.status, e.code)
		}
	case r.Header.Get("Sec-WebSocket-Version") != "13" && strings.ToLower(r.Header.Get("Upgrade")) == "websocket":
		w.Header().Set("Sec-WebSocket-Version", "13") // the version spoken here (RFC 6455 §4.4)
		fallthrough
	default:
		writeJSON(w, e.status, errorBody(e.code, e.message))
	}
}

// closeRefused sends a close frame on a handshake completed only to be
// refused, half-closes, and waits up to closeWait for the client to close
// its side (RFC 6455 §7.1.1), as a closing connection does.
func closeRefused(netConn net.Conn, code int, reason string) {
	defer netConn.Close()
	netConn.SetDeadline(time.Now().Add(closeWait))
	frame := binary.BigEndian.AppendUint16(appendFrameHeader(nil, opClose, 2+len(reason)), uint16(code))
	if _, err := netConn.Write(append(frame, reason...)); err == nil {
		halfClose(netConn)
		io.Copy(io.Discard, io.LimitReader(netConn, 64<<10))
	}
}

// upgrade lets x/net/websocket answer 101, and returns the raw socket and
// its reader, or nil if the library refused. From here on conn reads and
// writes frames itself. net/http hands the hijacker 4 KiB buffers each way:
// only the 101 goes through the writer, and client messages are mostly
// small, so smaller ones save about 7 KiB on every open connection.
func upgrade(w http.ResponseWriter, r *http.Request) (net.Conn, *bufio.Reader) {
	h := &hijackCapture{ResponseWriter: w}
	upgraded := false
	websocket.Server{Handler: func(*websocket.Conn) { upgraded = true },
		// wsproxy speaks no subprotocol; a browser that offers some (to carry
		// a token, say) fails without one in the answer: echo the first.
		Handshake: func(cfg *websocket.Config, _ *http.Request) error {
			cfg.Protocol = cfg.Protocol[:min(1, len(cfg.Protocol))]
			return nil
		}}.ServeHTTP(h, r)
	if h.netConn != nil && !upgraded {
		h.netConn.Close() // keepOpen kept x/net/websocket from closing it
	}
	if !upgraded {
		return nil, nil
	}
	h.netConn.SetDeadline(time.Time{}) // net/http's request deadlines: the connection keeps its own
	return h.netConn, h.reader
}

type hijackCapture struct {
	http.ResponseWriter
	netConn net.Conn
	reader  *bufio.Reader
}

func (h *hijackCapture) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	netConn, rw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	var source io.Reader = netConn
	if n := rw.Reader.Buffered(); n > 0 { // bytes of frames that came with the request: read them first
		early, _ := rw.Reader.Peek(n)
		source = io.MultiReader(bytes.NewReader(bytes.Clone(early)), netConn)
	}
	h.netConn, h.reader = netConn, bufio.NewReaderSize(source, readBuffer)
	return keepOpen{netConn}, bufio.NewReadWriter(h.reader, bufio.NewWriterSize(netConn, 256)), nil
}

// keepOpen is the socket as x/net/websocket sees it: its Server closes the
// socket when its handler returns, which here is at once.
type keepOpen struct{ net.Conn }

func (keepOpen) Close() error { return nil }

// ---------------------------------------------------------------------------
// The connection (README: Messages, Limits and abuse)

// WebSocket opcodes (RFC 6455 §5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xA
)

// outFrame is one frame to write.
type outFrame struct {
	op        byte
	streamEnd bool   // a worker's stream_end control message
	data      []byte // shared by every connection of the session: never modified
	received  int64  // UnixNano when Redis delivered it; 0 for frames wsproxy makes
	sent      int    // bytes of its encoding already written
}

// conn is one client. Its reader (serve, then readLoop) is the only
// goroutine that reads the socket. Frames are written in one of two ways,
// never both at once. While no writer runs, send (on whichever goroutine
// calls it: the Redis reader, the reader, the sweeper) writes the queue
// itself with one system call that does not wait: that is how a client that
// keeps up is served, without waking a goroutine. What the kernel does not
// take is left to a writer (writeLoop), which exists only while the socket
// is slow, waits for it, and ends when the queue is empty. So an idle
// connection costs a socket, a small read buffer and one goroutine.
type conn struct {
	// Set before the connection is shared, then only read.
	p                  *proxy
	id                 uint64
	agentID, sessionID string
	channel            string // session:{id}:down
	remote             string
	opened             time.Time
	netConn            net.Conn
	raw                syscall.RawConn // netConn's descriptor, for tryWrite

	reader      *bufio.Reader // the reader goroutine's alone
	inbound     atomic.Int64  // bytes of the reader's message buffer, in metrics.inboundBytes
	assembling  atomic.Int64  // UnixNano since the message being read began; 0 between messages
	pingedAt    time.Time     // the sweeper's alone, as refreshedAt
	refreshedAt time.Time
	once        oneWrite // tryWrite's system call and result: whoever writes, one at a time
	attempt     func(uintptr) bool
	writers     sync.WaitGroup // the writer, for serve to wait on

	mu           sync.Mutex // guards everything below
	lastData     int64      // UnixNano of the last data message either way
	streamEnd    int64      // UnixNano of the last stream_end; 0 once data followed
	down, up     int64      // messages, for the close log
	queue        []outFrame // frames not yet written whole, oldest first
	inFlight     int        // frames at the front of queue that the writer is writing
	queued       int        // cost of the frames in queue but the close frame; also in metrics.queuedBytes
	behindSince  int64      // UnixNano when the running writer started: the client is behind since
	started      bool       // from the 101 until the reader ends: frames may go out
	writing      bool       // a writeLoop runs: only it writes
	flushPending bool       // the Redis reader flushes the queue once it has dispatched what it read
	closing      bool       // the close frame is queued, or the socket failed: nothing more is queued
	warned       bool       // the 80% warning was logged
	reason       string     // why the connection closes, for the log
}

// attach gives the connection its socket.
func (c *conn) attach(netConn net.Conn, reader *bufio.Reader) {
	c.netConn, c.reader = netConn, reader
	if tcp, ok := netConn.(*net.TCPConn); ok {
		tcp.SetWriteBuffer(sendBuffer)
		c.raw, _ = tcp.SyscallConn()
	}
	c.attempt = c.once.attempt // made once: a method value passed on is made anew each time
}

// serve runs the open connection on a goroutine of its own, started by
// handleWebSocket. It returns when the connection is over, after its writer,
// and releases the slot that drain waits for.
func (c *conn) serve() {
	m := c.p.metrics
	m.active.Add(1)
	m.connections["accepted"].Add(1)
	c.log(slog.LevelInfo, "connection open", "remote", c.remote)
	c.mu.Lock()
	c.started = true
	c.flushLocked() // what arrived during the handshake
	c.mu.Unlock()

	readErr := c.readLoop()

	c.p.hub.leave(c)
	c.mu.Lock()
	c.reason = cmp.Or(c.reason, readErr.Error())
	closeQueued := c.closing           // let the writer deliver it; writeWait bounds that
	c.closing, c.started = true, false // and start no other writer
	c.mu.Unlock()
	if !closeQueued {
		c.netConn.Close() // nothing more to say: unblock a writer stuck on a dead peer
	}
	c.writers.Wait()
	c.netConn.Close()
	c.mu.Lock()
	c.account(-c.queued) // what was never written
	down, up := c.down, c.up
	c.mu.Unlock()
	m.active.Add(-1)
	if c.p.cfg.AuthMode == "redis" && c.p.cfg.AuthGrace > 0 {
		c.p.refreshTokens(c.sessionID) // the grace period counts from the disconnect; before drain may end
	}
	c.p.releaseSlot()
	c.log(slog.LevelInfo, "connection closed", "reason", c.reason,
		"duration", time.Since(c.opened).Round(time.Millisecond).String(), "messages_down", down, "messages_up", up)
}

// readLoop reads frames until the connection ends. It answers pings,
// reassembles fragmented messages (browsers split those over about 128 KiB)
// and applies MAX_MESSAGE_SIZE_BYTES to the whole message.
func (c *conn) readLoop() error {
	var message []byte
	var messageOp byte // opcode of the message being assembled; 0 = none
	tooLarge := false
	defer c.releaseInbound()
	for {
		c.stillAlive()
		h, err := readFrameHeader(c.reader)
		if err != nil {
			return err
		}
		if problem := h.violation(messageOp != 0); problem != "" {
			c.closeWith(1002, "protocol error", true)
			return errors.New("protocol error: " + problem)
		}
		if h.op >= opClose {
			var buf [125]byte
			payload, err := c.readPayload(buf[:0], h, false)
			if err == nil {
				err = c.handleControl(h.op, payload)
			}
			if err != nil {
				return err
			}
			continue
		}
		if h.op != opContinuation {
			messageOp, message, tooLarge = h.op, nil, false
			c.assembling.Store(time.Now().UnixNano())
		}
		// Both terms are below 2^63 (violation), so the sum cannot overflow.
		tooLarge = tooLarge || uint64(len(message))+h.length > uint64(c.p.cfg.MaxMessageSize)
		if message, err = c.readPayload(message, h, tooLarge); err != nil || !h.fin {
			if err != nil {
				return err
			}
			continue
		}
		c.assembling.Store(0) // whole: while it is published it still counts, but is no sender to shed
		if err := c.handleMessage(messageOp, message, tooLarge); err != nil {
			return err
		}
		messageOp, message = 0, nil // an idle connection holds no message buffer
		c.releaseInbound()
	}
}

// holdInbound counts n more bytes of the reader's message buffer against
// MAX_TOTAL_BUFFER_BYTES, which bounds all of them together (README: Limits
// and abuse); past it, the clients sending the longest are closed.
func (c *conn) holdInbound(n int64) {
	c.inbound.Add(n)
	if c.p.metrics.inboundBytes.Add(n) > int64(c.p.cfg.MaxTotalBuffer) {
		c.p.shedSenders()
	}
}

// releaseInbound gives back what the reader's message buffer counted.
func (c *conn) releaseInbound() {
	c.assembling.Store(0)
	c.p.metrics.inboundBytes.Add(-c.inbound.Swap(0))
}

// stillAlive pushes the read deadline on: anything read, even a pong,
// proves the peer is there (README: Liveness).
func (c *conn) stillAlive() {
	c.netConn.SetReadDeadline(time.Now().Add(c.p.cfg.PingInterval + c.p.cfg.PingTimeout))
}

// frameHeader is what precedes a frame's payload (RFC 6455 §5.2).
type frameHeader struct {
	fin, rsv, masked bool
	op               byte
	length           uint64
	mask             [4]byte
}

func readFrameHeader(r io.Reader) (h frameHeader, err error) {
	var b [8]byte
	if _, err = io.ReadFull(r, b[:2]); err != nil {
		return h, err
	}
	h.fin, h.rsv, h.op = b[0]&0x80 != 0, b[0]&0x70 != 0, b[0]&0x0f
	h.masked, h.length = b[1]&0x80 != 0, uint64(b[1]&0x7f)
	switch h.length {
	case 126:
		_, err = io.ReadFull(r, b[:2])
		h.length = uint64(binary.BigEndian.Uint16(b[:2]))
	case 127:
		_, err = io.ReadFull(r, b[:8])
		h.length = binary.BigEndian.Uint64(b[:8])
	}
	if err == nil && h.masked {
		_, err = io.ReadFull(r, h.mask[:])
	}
	return h, err
}

// violation says how a client's frame breaks RFC 6455, or "" when it does
// not. inMessage: a fragmented message is being assembled.
func (h frameHeader) violation(inMessage bool) string {
	switch {
	case !h.masked:
		return "unmasked frame" // §5.1: clients mask every frame
	case h.rsv:
		return "reserved bits set" // §5.2: no extension was negotiated
	case h.length >= 1<<63:
		return "payload length with its most significant bit set" // §5.2
	case h.op == opClose || h.op == opPing || h.op == opPong:
		if !h.fin || h.length > 125 {
			return "fragmented or long control frame" // §5.5
		}
	case h.op > opBinary:
		return "reserved opcode" // §5.2
	case h.op == opContinuation && !inMessage:
		return "continuation without a message" // §5.4
	case h.op != opContinuation && inMessage:
		return "new message inside a fragmented one" // §5.4
	}
	return ""
}

// readPayload reads a frame's payload and appends it to b, unmasked, or
// discards it. It takes what has arrived at each read, and b grows from
// 4 KiB by doubling as bytes arrive: memory follows what a client sent,
// never the length its header claims.
func (c *conn) readPayload(b []byte, h frameHeader, discard bool) ([]byte, error) {
	for pos := uint64(0); pos < h.length; {
		c.stillAlive() // each read that brings bytes proves the peer is there
		want, got, err := int(min(h.length-pos, readChunk)), 0, error(nil)
		if discard {
			if _, err = c.reader.Peek(1); err == nil {
				got, err = c.reader.Discard(min(want, c.reader.Buffered()))
			}
		} else {
			if len(b) == cap(b) {
				old := cap(b)
				b = slices.Grow(b, min(want, max(len(b), 4<<10)))
				c.holdInbound(int64(cap(b) - old))
			}
			room := b[len(b):min(cap(b), len(b)+want)]
			got, err = c.reader.Read(room)
			for i := range got { // RFC 6455 §5.3
				room[i] ^= h.mask[(pos+uint64(i))%4]
			}
			b = b[:len(b)+got]
		}
		if pos += uint64(got); err != nil {
			return b, err
		}
	}
	return b, nil
}

// handleControl answers a ping with a pong, and a close with a close (RFC
// 6455 §5.5.1), which ends the connection: it returns why.
func (c *conn) handleControl(op byte, payload []byte) error {
	if op == opPing {
		c.send(outFrame{op: opPong, data: bytes.Clone(payload)}, false)
	}
	if op != opClose {
		return nil
	}
	code := 1000 // echo the client's code; none given means normal
	if len(payload) >= 2 {
		code = int(binary.BigEndian.Uint16(payload))
	}
	switch {
	case len(payload) == 1 || !(code >= 1000 && code <= 1003 || code >= 1007 && code <= 1014 || code >= 3000 && code <= 4999):
		code = 1002 // a code that may not be sent (§7.4.1): protocol error
	case !utf8.Valid(payload[min(2, len(payload)):]):
		code = 1007 // the reason must be UTF-8 (§5.5.1, §8.1)
	}
	c.closeWith(code, "", false)
	return fmt.Errorf("client closed, answered %d", code)
}

// handleMessage publishes one whole client message upstream, or answers it
// with a control error and keeps the connection open. A text message that
// is not UTF-8 fails the connection instead (RFC 6455 §8.1).
func (c *conn) handleMessage(op byte, message []byte, tooLarge bool) error {
	cfg, m := c.p.cfg, c.p.metrics
	switch {
	case tooLarge:
		c.sendError("message_too_large", "messages are limited to "+strconv.Itoa(cfg.MaxMessageSize)+" bytes")
	case op == opBinary:
		c.sendError("binary_not_supported", "send JSON in text frames")
	case !utf8.Valid(message):
		c.closeWith(1007, "invalid UTF-8", true)
		return errors.New("invalid UTF-8 in a text message")
	case !cfg.UpstreamEnabled:
		c.sendError("upstream_disabled", "this server does not forward client messages")
	case !json.Valid(message):
		c.sendError("invalid_json", "messages must be valid JSON")
	default:
		if err := c.p.publish("session:"+c.sessionID+":up", message); err != nil {
			c.log(slog.LevelWarn, "publish failed", "err", err)
			c.sendError("publish_failed", "the message could not be delivered to Redis")
			return nil
		}
		m.messagesUp.Add(1)
		m.bytesUp.Add(int64(len(message)))
		c.mu.Lock()
		c.up, c.lastData, c.streamEnd = c.up+1, time.Now().UnixNano(), 0
		c.mu.Unlock()
	}
	return nil
}

func (c *conn) sendError(code, message string) {
	c.p.metrics.clientErrors[code].Add(1)
	data, _ := json.Marshal(map[string]string{"type": "control", "command": "error", "code": code, "message": message})
	c.send(outFrame{op: opText, data: data}, false)
}

// sweep is called by the sweeper for every connection: ping when due, and
// close after the idle or stream-end timeout. It reports when the session's
// token needs its grace period restarted (every half of it).
func (c *conn) sweep(now time.Time) (refreshToken bool) {
	cfg := c.p.cfg
	if now.Sub(c.pingedAt) >= cfg.PingInterval {
		c.pingedAt = now
		c.send(outFrame{op: opPing}, false)
	}
	if cfg.AuthMode == "redis" && cfg.AuthGrace > 0 && now.Sub(c.refreshedAt) >= cfg.AuthGrace/2 {
		c.refreshedAt, refreshToken = now, true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch at := now.UnixNano(); {
	case cfg.IdleTimeout > 0 && at-c.lastData >= int64(cfg.IdleTimeout):
		c.closeLocked(1000, "idle timeout", false)
	case cfg.StreamEndTimeout > 0 && c.streamEnd != 0 && at-c.streamEnd >= int64(cfg.StreamEndTimeout):
		c.closeLocked(1000, "stream ended", false)
	}
	return refreshToken
}

// send queues f and writes the queue at once when the socket can take it
// (flushLocked). It never blocks, because the Redis reader calls it. The
// reader defers the write (deferred) until it has dispatched every message
// it holds, so that a burst for one connection goes out in one system call;
// send then reports that the connection waits for that flush.
//
// A connection is closed with 1008 instead of being waited for when its
// queue would pass MAX_BUFFER_SIZE_BYTES, or when it is behind (its writer
// waits for the socket) and all queues together would pass
// MAX_TOTAL_BUFFER_BYTES, whatever the frame (dispatch has first closed the
// clients behind the longest), or when it is still in its handshake and
// the total would pass: a client that keeps up is never closed for others.
func (c *conn) send(f outFrame, deferred bool) (flushPending bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return false
	}
	switch {
	case f.received != 0 && f.streamEnd:
		c.streamEnd = f.received
	case f.received != 0:
		c.lastData, c.streamEnd = f.received, 0
	}
	cfg := c.p.cfg
	if c.queued > 0 && c.queued+cost(f) > cfg.MaxBufferSize { // one larger message still goes to an empty queue
		c.tooSlowLocked("connection", cfg.MaxBufferSize)
		return false
	}
	if (c.writing || !c.started) && c.p.metrics.queuedBytes.Load()+int64(cost(f)) > int64(cfg.MaxTotalBuffer) {
		c.tooSlowLocked("total", cfg.MaxTotalBuffer) // a pong for a client that does not read, a handshake's backlog
		return false
	}
	c.queue = append(c.queue, f)
	c.account(cost(f))
	if !c.warned && c.queued > cfg.MaxBufferSize/5*4 {
		c.warned = true
		c.log(slog.LevelWarn, "client is falling behind", "queued_bytes", c.queued, "limit_bytes", cfg.MaxBufferSize)
	}
	switch {
	case !c.started || c.writing || c.flushPending: // the open, the writer or the flush takes it
	case deferred:
		c.flushPending = true
		return true
	default:
		c.flushLocked()
	}
	return false
}

// tooSlowLocked closes a client that cannot keep up, for the bound named.
func (c *conn) tooSlowLocked(limit string, bound int) {
	if c.closing {
		return
	}
	c.p.metrics.slowCloses[limit].Add(1)
	c.log(slog.LevelWarn, "closing slow client", "queued_bytes", c.queued, "limit", limit, "limit_bytes", bound)
	c.closeLocked(1008, "client too slow", true)
}

// halfWrittenLocked reports whether a frame is being written, or has been
// in part: a close frame can only follow it.
func (c *conn) halfWrittenLocked() bool {
	return c.inFlight > 0 || len(c.queue) > 0 && c.queue[0].sent > 0
}

// disconnectLocked ends the connection at once, without a close frame,
// and drops the whole queue, the frame being written included: the writer
// fails, or finishes its own copy of the current write and finds nothing
// left; the reader fails, and serve ends the connection.
func (c *conn) disconnectLocked(reason string) {
	c.closing = true
	c.reason = cmp.Or(c.reason, reason)
	c.dropQueueLocked()
	c.netConn.Close()
}

// dropQueueLocked forgets every frame queued, and what they counted.
func (c *conn) dropQueueLocked() {
	c.account(-c.queued)
	c.queue = nil
}

// cost is what a queued frame counts against the queue bounds.
func cost(f outFrame) int { return len(f.data) + frameOverhead }

// account adds n (negative: written or dropped) to the bytes queued, for
// this connection and for all of them. c.mu is held.
func (c *conn) account(n int) {
	c.queued += n
	c.p.metrics.queuedBytes.Add(int64(n))
}

// closeWith queues a close frame after what is queued, or instead of it when
// drop is set; with drop, a connection that has a frame half-written to it
// is disconnected at once instead, since a close frame could only follow
// that frame. Nothing is queued after it.
func (c *conn) closeWith(code int, reason string, drop bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeLocked(code, reason, drop)
}

func (c *conn) closeLocked(code int, reason string, drop bool) {
	if c.closing {
		return
	}
	c.closing = true
	c.reason = cmp.Or(c.reason, reason)
	if drop && c.halfWrittenLocked() { // a close frame could only follow that frame: keep nothing instead
		c.disconnectLocked(reason)
		return
	}
	if drop {
		c.dropQueueLocked()
	}
	payload := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(reason)), uint16(code))
	c.queue = append(c.queue, outFrame{op: opClose, data: append(payload, reason...)}) // not counted in queued
	c.flushLocked()
}

// flushLocked writes the front of the queue with one system call that does
// not wait, and starts the writer for what the kernel did not take. c.mu is
// held.
func (c *conn) flushLocked() {
	c.flushPending = false
	if !c.started || c.writing || len(c.queue) == 0 {
		return
	}
	buf := getBuffer()
	defer putBuffer(buf)
	*buf, _ = c.encodeLocked((*buf)[:0])
	n, err := c.tryWrite(*buf, false)
	if err != nil {
		c.failLocked(err)
		return
	}
	c.advanceLocked(n)
	if len(c.queue) > 0 {
		c.writing, c.behindSince = true, time.Now().UnixNano()
		c.writers.Add(1)
		go c.writeLoop() // ends when the queue is empty; serve waits for it
	}
}

// writeLoop writes the queue while the socket is slow, waiting for it up to
// writeWait a write. Frames stay at the front of the queue while it writes
// them (inFlight), so that a close that drops the queue keeps them whole.
func (c *conn) writeLoop() {
	defer c.writers.Done()
	buf := getBuffer()
	defer putBuffer(buf)
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.queue) > 0 {
		*buf, c.inFlight = c.encodeLocked((*buf)[:0])
		c.mu.Unlock()
		err := c.write(*buf)
		c.mu.Lock()
		c.inFlight = 0
		if err != nil {
			c.failLocked(err)
			break
		}
		c.advanceLocked(len(*buf))
	}
	c.writing = false
}

// encodeLocked encodes frames from the front of the queue (RFC 6455 §5.2:
// FIN set, as wsproxy never fragments; a server does not mask), but what
// of them was sent already, up to maxWrite bytes and never past the close
// frame. n is how many frames it took, the last one perhaps in part.
func (c *conn) encodeLocked(b []byte) (_ []byte, n int) {
	for n < len(c.queue) && len(b) < maxWrite {
		f := &c.queue[n]
		n++
		var h [10]byte
		header := appendFrameHeader(h[:0], f.op, len(f.data))
		skip := min(f.sent, len(header))
		b = append(b, header[skip:]...)
		data := f.data[f.sent-skip:]
		b = append(b, data[:min(len(data), max(0, maxWrite-len(b)))]...)
		if f.op == opClose {
			break
		}
	}
	return b, n
}

// advanceLocked takes the bytes written off the front of the queue: frames
// written whole are counted and dropped, the next remembers how much of it
// went out. After the close frame the connection half-closes and gives the
// client closeWait to answer; its reader sees that close frame or EOF.
func (c *conn) advanceLocked(written int) {
	m, now, done := c.p.metrics, time.Now().UnixNano(), 0
	for ; done < len(c.queue) && written > 0; done++ {
		f := &c.queue[done]
		left := headerLength(len(f.data)) + len(f.data) - f.sent
		if written < left {
			f.sent += written
			break
		}
		written -= left
		switch {
		case f.op == opClose:
			halfClose(c.netConn)
			time.AfterFunc(closeWait, func() { c.netConn.Close() })
			continue
		case f.received != 0:
			c.down++
			m.messagesDown.Add(1)
			m.bytesDown.Add(int64(len(f.data)))
			m.latency.observe(now - f.received)
		}
		c.account(-cost(*f))
	}
	rest := len(c.queue) - done
	clear(c.queue[:done])
	switch {
	case rest == 0 && cap(c.queue) > queueKeep:
		c.queue = nil
	case rest == 0:
		c.queue = c.queue[:0] // keep the array: no allocation per message
	default:
		c.queue = c.queue[done:]
	}
}

// write writes b whole for the writer: first without waiting, then waiting
// for room in the socket, but never writeWait without progress: a client
// whose socket takes nothing for that long is gone (README: Liveness).
func (c *conn) write(b []byte) error {
	n, err := c.tryWrite(b, false)
	waited := false
	for ; err == nil && n < len(b); n, err = c.tryWrite(b, true) {
		b = b[n:]
		c.netConn.SetWriteDeadline(time.Now().Add(writeWait))
		waited = true
	}
	if waited {
		c.netConn.SetWriteDeadline(time.Time{}) // else tryWrite fails once it has passed
	}
	return err
}

// tryWrite makes one write system call of b and returns what the kernel
// took. When the socket is full it returns 0 at once, or with wait set,
// waits for room first (up to the write deadline). Only one of flushLocked
// and writeLoop calls it at a time (see conn).
func (c *conn) tryWrite(b []byte, wait bool) (int, error) {
	if c.raw == nil { // not a socket: only the writer writes, and waits
		if !wait {
			return 0, nil
		}
		return c.netConn.Write(b)
	}
	c.once = oneWrite{b: b, wait: wait} // a closed socket makes no attempt: no result of the last one
	err := c.raw.Write(c.attempt)
	n, errno := c.once.n, c.once.err
	c.once.b = nil
	if err == nil && errno != syscall.EAGAIN {
		err = errno
	}
	if err != nil {
		return 0, err
	}
	return n, nil
}

// oneWrite is one write system call as syscall.RawConn.Write runs it:
// attempt is done after one try, so that Write never parks the goroutine,
// unless wait is set and the socket was full.
type oneWrite struct {
	b    []byte
	wait bool
	n    int
	err  error
}

func (w *oneWrite) attempt(fd uintptr) bool {
	w.n, w.err = rawSyscall(syscall.SYS_WRITE, fd, w.b)
	return !w.wait || w.err != syscall.EAGAIN
}

// rawSyscall reads or writes a socket that does not block. syscall.Read
// and syscall.Write would tell the scheduler that the call may block, which
// wakes its monitor thread after every idle moment: on a busy fan-out that
// was a sixth of the proxy's CPU.
func rawSyscall(trap, fd uintptr, b []byte) (int, error) {
	for {
		n, _, errno := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			continue
		}
		return 0, errno
	}
}

// failLocked ends a connection whose socket failed. c.mu is held.
func (c *conn) failLocked(err error) {
	c.closing = true
	c.reason = cmp.Or(c.reason, "write: "+err.Error())
	c.netConn.Close() // the reader fails too, and serve ends the connection
}

func (c *conn) log(level slog.Level, msg string, args ...any) {
	c.p.log.Log(context.Background(), level, msg,
		append([]any{"conn", c.id, "session_id", c.sessionID, "agent_id", c.agentID}, args...)...)
}

// writeBuffers holds encoding buffers for flushLocked and the writers; one
// too large to keep is dropped.
var writeBuffers = sync.Pool{New: func() any { return new([]byte) }}

func getBuffer() *[]byte { return writeBuffers.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if cap(*b) <= 2*maxWrite {
		writeBuffers.Put(b)
	}
}

func appendFrameHeader(b []byte, op byte, n int) []byte {
	b = append(b, 0x80|op)
	switch headerLength(n) {
	case 2:
		return append(b, byte(n))
	case 4:
		return append(b, 126, byte(n>>8), byte(n))
	}
	return binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
}

// headerLength is the length of a server frame's header (RFC 6455 §5.2).
func headerLength(payload int) int {
	switch {
	case payload <= 125:
		return 2
	case payload <= 0xFFFF:
		return 4
	}
	return 10
}

// refreshTokens restarts the grace period of the sessions' auth keys, in
// one round trip: when a client leaves, and while it stays longer than the
// grace period, so that it can always reconnect within the grace period
// after it leaves. EXPIRE on a key a worker deleted does nothing, so a
// revoked token stays so.
func (p *proxy) refreshTokens(sessionIDs ...string) {
	err := p.redisDo(func(c redis.Conn) error {
		for _, id := range sessionIDs {
			c.Send("EXPIRE", "session:"+id+":auth", graceSeconds(p.cfg))
		}
		_, err := c.Do("") // flushes, and reads every reply
		return err
	})
	if err != nil {
		p.log.Warn("could not refresh the tokens' grace period", "sessions", len(sessionIDs), "err", err)
	}
}

func (p *proxy) publish(channel string, message []byte) error {
	return p.redisDo(func(c redis.Conn) error {
		_, err := c.Do("PUBLISH", channel, message)
		return err
	})
}

// redisDo runs f on a pool connection, waiting at most redisCommandTimeout
// for one when all are busy.
func (p *proxy) redisDo(f func(redis.Conn) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), redisCommandTimeout)
	defer cancel()
	c, err := p.pool.GetContext(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c)
}

// ---------------------------------------------------------------------------
// The hub: one Redis subscriber for every session (README: Redis outages)

// hub owns the shared PubSubConn. SUBSCRIBE confirmations come back in the
// order the commands were sent, so each channel has a FIFO of waiters: a
// confirmation releases the oldest waiter of its channel, which is the
// handshake whose SUBSCRIBE it answers, never a later one. Every handshake
// sends its own SUBSCRIBE, even when the channel is subscribed already: that
// costs one small command and makes it correct when the previous
// connection's UNSUBSCRIBE is still in flight (Redis answers in order, so
// the channel ends up subscribed).
type hub struct {
	cfg     *config
	log     *slog.Logger
	metrics *metrics

	lostAt atomic.Int64 // UnixNano when the subscriber was last lost
	heard  atomic.Int64 // UnixNano of the subscriber's last reply

	mu       sync.Mutex                // guards the three below; taken before any conn.mu
	psc      *redis.PubSubConn         // nil while Redis is unreachable
	channels map[string][]*conn        // connections by channel, handshakes included
	waiting  map[string][]chan<- error // SUBSCRIBEs sent, oldest first; nil for a resubscription

	flushes []*conn // connections whose write dispatch deferred: the receiving goroutine's alone
	ever    bool    // the subscriber has connected before: run's goroutine's alone
}

func (h *hub) connected() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.psc != nil
}

// join registers c, sends its SUBSCRIBE and waits for Redis to confirm that
// one; on failure c is gone again.
func (h *hub) join(ctx context.Context, c *conn) *handshakeError {
	unavailable := &handshakeError{503, "redis_unavailable", "Redis is unavailable"}
	confirmed := make(chan error, 1)
	h.mu.Lock()
	subscribed := h.psc != nil && h.psc.Subscribe(c.channel) == nil
	if subscribed {
		h.channels[c.channel] = append(h.channels[c.channel], c)
		h.waiting[c.channel] = append(h.waiting[c.channel], confirmed)
		h.metrics.subscribedChannels.Store(int64(len(h.channels)))
	} else if h.psc != nil {
		h.psc.Close() // the receiver fails too, and run reconnects
	}
	h.mu.Unlock()
	if !subscribed {
		return unavailable
	}
	timeout := time.NewTimer(h.cfg.SubscribeTimeout)
	defer timeout.Stop()
	var err error
	select {
	case err = <-confirmed: // nil, or the subscriber was lost
	case <-timeout.C:
		c.abandon()
		return &handshakeError{504, "subscribe_timeout", "Redis did not confirm the subscription in time"}
	case <-ctx.Done(): // the client left: refuse counts an abort
		err = ctx.Err()
	}
	if err != nil {
		c.abandon()
		return unavailable
	}
	return nil
}

// abandon forgets a connection whose handshake failed after it joined its
// channel, and drops what was queued for it meanwhile.
func (c *conn) abandon() {
	c.p.hub.leave(c)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closing = true // a sweeper holding it queues nothing more
	c.dropQueueLocked()
}

// leave forgets c, and unsubscribes when it was the channel's last connection.
func (h *hub) leave(c *conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	conns := h.channels[c.channel]
	if i := slices.Index(conns, c); i >= 0 {
		conns[i] = conns[len(conns)-1]
		conns[len(conns)-1] = nil
		conns = conns[:len(conns)-1]
	}
	if len(conns) > 0 {
		h.channels[c.channel] = conns
		return
	}
	delete(h.channels, c.channel)
	h.metrics.subscribedChannels.Store(int64(len(h.channels)))
	if h.psc != nil && h.psc.Unsubscribe(c.channel) != nil {
		h.psc.Close()
	}
}

// conns returns every connection, handshakes included, in buf's array:
// the caller works on them without holding up the Redis reader.
func (h *hub) conns(buf []*conn) []*conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	buf = buf[:0]
	for _, conns := range h.channels {
		buf = append(buf, conns...)
	}
	return buf
}

// run keeps the subscriber connected until ctx ends, reconnecting with
// capped, jittered exponential backoff.
func (h *hub) run(ctx context.Context) {
	for backoff := reconnectMin; ; backoff = min(backoff*2, reconnectMax) {
		began := time.Now()
		err := h.subscriber(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > reconnectMax {
			backoff = reconnectMin // it was up for a while: a fresh failure
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		h.log.Warn("redis subscriber unavailable; retrying", "err", err, "retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// subscriber is one connected period of the shared PubSubConn, in the shape
// of redigo's pub/sub example: connect and resubscribe, then ping it and
// wait for the receiver to fail or ctx to end, then tear down.
func (h *hub) subscriber(ctx context.Context) error {
	psc, err := h.connect(ctx)
	if err != nil {
		return err
	}
	received := make(chan error, 1)
	go h.receive(psc, received) // ends when psc fails or is closed; watch waits for it
	err = h.watch(ctx, psc, received)
	h.mu.Lock()
	h.psc = nil
	for _, waiters := range h.waiting { // their handshakes answer 503 now
		for _, w := range waiters {
			if w != nil {
				w <- errors.New("redis subscriber lost")
			}
		}
	}
	clear(h.waiting)
	h.mu.Unlock()
	h.metrics.redisConnected.Store(0)
	h.lostAt.Store(time.Now().UnixNano())
	if ctx.Err() == nil {
		h.log.Warn("redis subscriber lost", "err", err)
	}
	return err
}

// connect dials the subscriber and subscribes every channel that has
// connections.
func (h *hub) connect(ctx context.Context) (*redis.PubSubConn, error) {
	dialCtx, cancel := context.WithTimeout(ctx, redisCommandTimeout)
	defer cancel()
	// No read timeout: watch notices silence, which spares a deadline per
	// message; a large read buffer spares system calls.
	rc, err := dialRedis(dialCtx, h.cfg, redis.DialReadTimeout(0),
		redis.DialContextFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			raw, err := c.(syscall.Conn).SyscallConn()
			return &subscriberConn{Conn: c, reader: bufio.NewReaderSize(rawReader{raw}, 64<<10), beforeWait: h.flush}, err
		}))
	if err != nil {
		return nil, err
	}
	psc := &redis.PubSubConn{Conn: rc}
	_, err = redis.DoWithTimeout(rc, redisReadTimeout, "PING")
	h.mu.Lock()
	defer h.mu.Unlock()
	for channel := range h.channels {
		psc.Conn.Send("SUBSCRIBE", channel)
		h.waiting[channel] = append(h.waiting[channel], nil)
	}
	if err == nil {
		err = psc.Subscribe(keepaliveChannel) // sends, with the above
	}
	if err != nil {
		clear(h.waiting)
		psc.Close()
		return nil, err
	}
	h.psc = psc
	h.heard.Store(time.Now().UnixNano())
	h.metrics.redisConnected.Store(1)
	if h.ever {
		h.metrics.redisReconnects.Add(1)
	}
	h.ever = true
	h.log.Info("redis subscriber connected", "resubscribed_channels", len(h.channels))
	return psc, nil
}

// watch pings the subscriber until the receiver reports its end or ctx
// ends, and returns why. A connection that is silent for redisReadTimeout
// is closed: it is dead, or half-open.
func (h *hub) watch(ctx context.Context, psc *redis.PubSubConn, received <-chan error) error {
	ping := time.NewTicker(redisPingPeriod)
	defer ping.Stop()
	for {
		select {
		case err := <-received:
			return err
		case now := <-ping.C:
			h.mu.Lock()
			if psc.Ping("") != nil || now.Sub(time.Unix(0, h.heard.Load())) > redisReadTimeout {
				psc.Close() // the receiver fails, and reports it
			}
			h.mu.Unlock()
		case <-ctx.Done():
			h.mu.Lock()
			psc.Unsubscribe()
			h.mu.Unlock()
			psc.Close()
			return <-received
		}
	}
}

// receive reads the shared subscription. It never waits for a client:
// dispatch only queues, and flush writes what the socket takes at once.
func (h *hub) receive(psc *redis.PubSubConn, done chan<- error) {
	for {
		v := psc.Receive()
		now := time.Now().UnixNano()
		h.heard.Store(now)
		switch v := v.(type) {
		case redis.Message:
			h.dispatch(v.Channel, v.Data, now)
		case redis.Subscription:
			if v.Kind == "subscribe" {
				h.confirm(v.Channel)
			}
		case error:
			done <- v
			return
		}
	}
}

// dispatch queues one message for every connection of its session.
func (h *hub) dispatch(channel string, data []byte, received int64) {
	f := outFrame{op: opText, data: data, received: received, streamEnd: isStreamEnd(data)}
	if !utf8.Valid(data) {
		f.op = opBinary
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.channels[channel] {
		if h.metrics.queuedBytes.Load()+int64(cost(f)) > int64(h.cfg.MaxTotalBuffer) {
			h.shedLocked(int64(cost(f)))
		}
		if c.send(f, true) {
			h.flushes = append(h.flushes, c)
		}
	}
}

// shedLocked closes with 1008 the clients that have been behind the
// longest (their writer waits for the socket) until n more bytes fit under
// MAX_TOTAL_BUFFER_BYTES. A client with nothing waiting is never closed for
// the others. h.mu is held.
func (h *hub) shedLocked(n int64) {
	type behind struct {
		c     *conn
		since int64
	}
	var candidates []behind
	for _, conns := range h.channels {
		for _, c := range conns {
			c.mu.Lock()
			if c.writing && !c.closing {
				candidates = append(candidates, behind{c, c.behindSince})
			}
			c.mu.Unlock()
		}
	}
	slices.SortFunc(candidates, func(a, b behind) int { return cmp.Compare(a.since, b.since) })
	for _, b := range candidates {
		if h.metrics.queuedBytes.Load()+n <= int64(h.cfg.MaxTotalBuffer) {
			return
		}
		b.c.mu.Lock()
		b.c.tooSlowLocked("total", h.cfg.MaxTotalBuffer)
		b.c.mu.Unlock()
	}
}

// shedSenders closes with 1008 the clients that have been sending their
// message the longest until the buffers of client messages fit under seven
// eighths of MAX_TOTAL_BUFFER_BYTES again: a client that trickles a large
// message holds its buffer, and one that sends at the pace of its network
// does not for long. Their sockets are closed at once, which frees their
// buffers.
func (p *proxy) shedSenders() {
	type sending struct {
		c     *conn
		since int64
	}
	var senders []sending
	for _, c := range p.hub.conns(nil) {
		if since := c.assembling.Load(); since != 0 && c.inbound.Load() > 0 {
			senders = append(senders, sending{c, since})
		}
	}
	slices.SortFunc(senders, func(a, b sending) int { return cmp.Compare(a.since, b.since) })
	for _, s := range senders {
		if p.metrics.inboundBytes.Load() <= int64(p.cfg.MaxTotalBuffer/8*7) { // some room, so that the next shed is not at once
			return
		}
		if !s.c.assembling.CompareAndSwap(s.since, 0) { // its message ended, or another reader shed it
			continue
		}
		held := s.c.inbound.Swap(0)
		p.metrics.inboundBytes.Add(-held)
		p.metrics.slowCloses["inbound"].Add(1)
		s.c.log(slog.LevelWarn, "closing slow client", "inbound_bytes", held, "limit", "inbound", "limit_bytes", p.cfg.MaxTotalBuffer)
		s.c.closeWith(1008, "message too slow", true)
		s.c.netConn.Close()
	}
}

// flush writes what dispatch deferred. The subscriber's socket calls it
// when it is about to wait for Redis: every message it had is dispatched.
func (h *hub) flush() {
	for _, c := range h.flushes {
		c.mu.Lock()
		c.flushLocked()
		c.mu.Unlock()
	}
	clear(h.flushes)
	h.flushes = h.flushes[:0]
}

// confirm releases the handshake whose SUBSCRIBE Redis has just confirmed.
// A resubscription after a reconnect has no handshake: its open connections
// learn that messages published during the outage were lost.
func (h *hub) confirm(channel string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	waiters := h.waiting[channel]
	if len(waiters) == 0 {
		return
	}
	if h.waiting[channel] = waiters[1:]; len(waiters) == 1 {
		delete(h.waiting, channel)
	}
	if waiters[0] != nil {
		waiters[0] <- nil
		return
	}
	for _, c := range h.channels[channel] {
		c.mu.Lock()
		open := c.started
		c.mu.Unlock()
		if open {
			c.sendError("redis_reconnected", "the connection to Redis was lost and restored; messages published meanwhile were not delivered")
		}
	}
}

// isStreamEnd reports whether a worker's message is the stream_end control
// message. The cheap test comes first: most messages are not.
func isStreamEnd(data []byte) bool {
	if !bytes.Contains(data, []byte("stream_end")) {
		return false
	}
	var m struct{ Type, Command string }
	return json.Unmarshal(data, &m) == nil && m.Type == "control" && m.Command == "stream_end"
}

func dialRedis(ctx context.Context, cfg *config, options ...redis.DialOption) (redis.Conn, error) {
	return redis.DialURLContext(ctx, cfg.RedisURL, append([]redis.DialOption{
		redis.DialConnectTimeout(redisCommandTimeout),
		redis.DialReadTimeout(redisCommandTimeout),
		redis.DialWriteTimeout(redisCommandTimeout)}, options...)...)
}

// subscriberConn is the subscriber's socket. It reads through a large
// buffer (redigo's own is 4 KiB: a system call per few messages on a busy
// subscriber), and calls beforeWait when all it read is consumed. Only the
// receiving goroutine reads it.
type subscriberConn struct {
	net.Conn
	reader     *bufio.Reader
	beforeWait func()
}

func (c *subscriberConn) Read(p []byte) (int, error) {
	if c.reader.Buffered() == 0 {
		c.beforeWait()
	}
	return c.reader.Read(p)
}

// rawReader reads a socket with rawSyscall, and waits in the network
// poller when nothing is there.
type rawReader struct{ raw syscall.RawConn }

func (r rawReader) Read(p []byte) (n int, err error) {
	if werr := r.raw.Read(func(fd uintptr) bool {
		n, err = rawSyscall(syscall.SYS_READ, fd, p)
		return err != syscall.EAGAIN
	}); werr != nil {
		return 0, werr
	}
	if err == nil && n == 0 && len(p) > 0 {
		err = io.EOF
	}
	return n, err
}

// ---------------------------------------------------------------------------
// Metrics, in the Prometheus text format (README: Operations)

// metrics are counters and gauges in atomics. Each is registered once, in
// families, in the order /metrics lists them.
type metrics struct {
	families                                                          []*family
	active, messagesDown, messagesUp, bytesDown, bytesUp, queuedBytes *atomic.Int64
	inboundBytes                                                      *atomic.Int64
	redisConnected, redisReconnects, subscribedChannels               *atomic.Int64
	connections, clientErrors, slowCloses                             map[string]*atomic.Int64 // by label value
	latency                                                           histogram
}

// family is one metric, and its values by label value ("" without a label).
type family struct {
	name, kind, help, label string
	values                  map[string]*atomic.Int64
}

func newMetrics() *metrics {
	m := &metrics{}
	one := func(name, kind, help string) *atomic.Int64 { return m.add(name, kind, help, "", "")[""] }
	m.active = one("wsproxy_active_connections", "gauge", "Open WebSocket connections.")
	m.connections = m.add("wsproxy_connections_total", "counter", "WebSocket handshakes by result.", "result",
		"accepted", "bad_request", "unauthorized", "forbidden", "unavailable", "timeout", "rejected", "aborted")
	messages := m.add("wsproxy_messages_total", "counter", "Messages forwarded; down counts each delivery to a connection.", "direction", "down", "up")
	bytes := m.add("wsproxy_bytes_total", "counter", "Payload bytes forwarded.", "direction", "down", "up")
	m.messagesDown, m.messagesUp, m.bytesDown, m.bytesUp = messages["down"], messages["up"], bytes["down"], bytes["up"]
	m.clientErrors = m.add("wsproxy_client_errors_total", "counter", "Control errors sent to clients, by code.", "code",
		"invalid_json", "message_too_large", "binary_not_supported", "publish_failed", "upstream_disabled", "redis_reconnected")
	m.slowCloses = m.add("wsproxy_slow_client_closes_total", "counter", "Connections closed with 1008, by the limit they would have passed.", "limit", "connection", "total", "inbound")
	m.queuedBytes = one("wsproxy_queued_bytes", "gauge", "Bytes queued for clients over all connections.")
	m.inboundBytes = one("wsproxy_inbound_bytes", "gauge", "Bytes held for client messages being reassembled, over all connections.")
	m.redisConnected = one("wsproxy_redis_connected", "gauge", "1 while the shared subscriber is connected.")
	m.redisReconnects = one("wsproxy_redis_reconnects_total", "counter", "Times the shared subscriber reconnected after a loss.")
	m.subscribedChannels = one("wsproxy_subscribed_channels", "gauge", "Redis channels subscribed.")
	m.latency.bounds = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}
	m.latency.counts = make([]atomic.Int64, len(m.latency.bounds)+1)
	return m
}

func (m *metrics) add(name, kind, help, label string, labelValues ...string) map[string]*atomic.Int64 {
	f := &family{name, kind, help, label, map[string]*atomic.Int64{}}
	for _, v := range labelValues {
		f.values[v] = new(atomic.Int64)
	}
	m.families = append(m.families, f)
	return f.values
}

// histogram counts observations per bucket (not cumulative; the exposition
// adds them up).
type histogram struct {
	bounds []float64 // seconds
	counts []atomic.Int64
	sum    atomic.Int64 // nanoseconds
}

func (h *histogram) observe(nanos int64) {
	h.counts[sort.SearchFloat64s(h.bounds, float64(nanos)/1e9)].Add(1)
	h.sum.Add(nanos)
}

func (m *metrics) handle(w http.ResponseWriter, r *http.Request) {
	var b strings.Builder
	sample := func(name, kind, help string, value any) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n%s %v\n", name, help, name, kind, name, value)
	}
	for _, f := range m.families {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.kind)
		for _, v := range slices.Sorted(maps.Keys(f.values)) {
			if f.label == "" {
				fmt.Fprintf(&b, "%s %d\n", f.name, f.values[v].Load())
			} else {
				fmt.Fprintf(&b, "%s{%s=%q} %d\n", f.name, f.label, v, f.values[v].Load())
			}
		}
	}
	const latency = "wsproxy_delivery_latency_seconds"
	fmt.Fprintf(&b, "# HELP %s From receipt from Redis to the frame written to the client.\n# TYPE %s histogram\n", latency, latency)
	var cumulative int64
	for i := range m.latency.counts {
		cumulative += m.latency.counts[i].Load()
		le := "+Inf"
		if i < len(m.latency.bounds) {
			le = strconv.FormatFloat(m.latency.bounds[i], 'g', -1, 64)
		}
		fmt.Fprintf(&b, "%s_bucket{le=%q} %d\n", latency, le, cumulative)
	}
	fmt.Fprintf(&b, "%s_sum %v\n%s_count %d\n", latency, float64(m.latency.sum.Load())/1e9, latency, cumulative)
	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	sample("go_goroutines", "gauge", "Goroutines that currently exist.", runtime.NumGoroutine())
	sample("go_memstats_heap_inuse_bytes", "gauge", "Bytes in in-use heap spans.", mem.HeapInuse)
	sample("go_memstats_stack_inuse_bytes", "gauge", "Bytes in stack spans.", mem.StackInuse)
	if rss, cpu, ok := processStats(); ok {
		sample("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss)
		sample("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.", cpu)
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	io.WriteString(w, b.String())
}

// processStats reads the resident memory from /proc (Linux; elsewhere ok
// is false) and the CPU time the process used.
func processStats() (rss int64, cpuSeconds float64, ok bool) {
	statm, err := os.ReadFile("/proc/self/statm") // sizes in pages: total, resident, ...
	var usage syscall.Rusage
	if _, scanErr := fmt.Sscan(string(statm), new(int64), &rss); err != nil || scanErr != nil || syscall.Getrusage(syscall.RUSAGE_SELF, &usage) != nil {
		return 0, 0, false
	}
	return rss * int64(os.Getpagesize()), time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds(), true
}

// ---------------------------------------------------------------------------
// Small helpers

// validID: 1-128 characters of [A-Za-z0-9._~-] (README: Endpoints).
func validID(s string) bool {
	return len(s) > 0 && len(s) <= 128 && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~-") == ""
}

// halfClose shuts the write side of a TCP connection: the peer reads EOF.
func halfClose(netConn net.Conn) {
	if tcp, ok := netConn.(*net.TCPConn); ok {
		tcp.CloseWrite()
	}
}

func graceSeconds(cfg *config) int64 { return int64(math.Ceil(cfg.AuthGrace.Seconds())) }

func getOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			writeJSON(w, http.StatusMethodNotAllowed, errorBody("method_not_allowed", "use GET"))
			return
		}
		h(w, r)
	}
}

func errorBody(code, message string) map[string]string {
	return map[string]string{"error": code, "message": message}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}
