// Command loadtest drives a wsproxy on this machine with sessions of its own
// and reports memory per connection, connection rate, delivery latency and
// CPU per message.
//
// Sessions: it writes session:{id}:auth = a random token to Redis (ids are a
// random run id and a number), connects as /load/ws/{id} with
// "Authorization: Bearer <token>" and no Origin header unless -origin is set,
// publishes to session:{id}:down itself, and deletes the auth keys when it
// ends, also on Ctrl+C or -timeout.
//
// Messages: every one is a JSON string "<unix nanos> <sequence> xxx…" of
// -size bytes. The client takes the latency PUBLISH -> WebSocket receive from
// the stamp, and counts a message whose sequence number is not its session's
// last plus one as out of order. Publishing goes over -publishers pipelined
// Redis connections, each owning every n-th session (so that a session's
// messages stay in order) and sending at most 1,024 PUBLISHes per write; at a
// rate, each sends its share on a 1 ms ticker and catches up when a tick
// comes late.
//
// Modes:
//
//	idle     Connect -n clients, -c at a time, wait -settle, and divide the
//	         growth of the proxy's RSS, Go heap and stacks by the connections
//	         established. Then publish one message to every session and count
//	         the connections that received it.
//	connect  Connect -n clients with -c concurrent dialers: connections per
//	         second over the whole batch, handshake latency (dial to 101).
//	fanout   One client on each of -sessions sessions. After a 2 s warm-up,
//	         publish -size byte messages round robin over the sessions at
//	         -rate msg/s in total for -duration: delivered, lost, latency, CPU
//	         per message. A comma list of rates runs each in turn and ends
//	         with a table of the medians per rate.
//	stream   One session. Publish -size byte messages as fast as the client
//	         takes them, at most -window published but not yet received:
//	         MB/s, msg/s, CPU per message, lost.
//
// CPU per message: the proxy's user+system time over the run (/proc/PID/stat
// before and after) divided by the messages delivered to the clients. fanout
// and stream also start a bare redigo subscriber, this program with -mode
// baresub as a child process, on the same channels in the same run; its CPU
// (/proc/PID/stat likewise) divided by the messages it received is the floor,
// and proxy / bare the proxy's overhead. Redis's CPU (INFO cpu), the load
// generator's own (getrusage) and everything else on the machine (/proc/stat)
// are shown beside them, since all share the cores. The proxy's own delivery
// latency (Redis receive -> frame written) is the difference of its
// wsproxy_delivery_latency_seconds histogram on /metrics between the start and
// the end of the run; heap, stacks and goroutines come from /metrics too.
//
// The proxy: -spawn BIN starts a fresh one for every idle and connect run and
// one for fanout and stream (PORT and REDIS_URL derived from -proxy and
// -redis, LOG_LEVEL=warn unless set); -pid or -pidfile names one started by
// hand; with neither, CPU and RSS come from /metrics. Only loopback addresses
// are accepted.
//
// Each measurement runs -runs times; stdout gets a table of every run and the
// median, stderr progress every second. From the repository root:
//
//	go build -o /tmp/wsproxy .
//	L="go run ./examples/loadtest -proxy ws://127.0.0.1:18080 -spawn /tmp/wsproxy"
//	$L -mode idle -n 15000
//	$L -mode idle -n 10000
//	$L -mode connect -n 10000
//	$L -mode fanout
//	$L -mode fanout -rate 20000,30000,40000,60000,80000 -duration 5s
//	$L -mode stream
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/gomodule/redigo/redis"
	"golang.org/x/net/websocket"
)

// cfg holds the flags.
var cfg struct {
	mode, proxy, redis, metrics, origin, spawn, rates, runID          string
	pid, n, dialers, sessions, size, runs, publishers, window, srcIPs int
	count                                                             int64
	duration, settle, timeout                                         time.Duration
	floor                                                             bool
	rateList                                                          []float64 // -rate
}

func parseFlags() {
	flag.StringVar(&cfg.mode, "mode", "", "idle | connect | fanout | stream")
	flag.StringVar(&cfg.proxy, "proxy", "ws://127.0.0.1:8080", "proxy base URL (loopback only)")
	flag.StringVar(&cfg.redis, "redis", "redis://127.0.0.1:6379", "Redis URL (loopback only)")
	flag.StringVar(&cfg.metrics, "metrics", "", "proxy metrics URL (default: derived from -proxy)")
	flag.StringVar(&cfg.origin, "origin", "", "Origin header for the clients (default none). With one, a refused handshake may be\nanswered by a 101 and a close frame: counted as a connection closed by the proxy, not a failed one")
	flag.IntVar(&cfg.pid, "pid", 0, "proxy PID: read CPU and RSS from /proc")
	pidfile := flag.String("pidfile", "", "file holding the proxy PID")
	flag.StringVar(&cfg.spawn, "spawn", "", "proxy binary to start itself (PORT, REDIS_URL from -proxy, -redis; LOG_LEVEL=warn unless set):\na fresh process for every idle and connect run, one for fanout and stream")
	flag.IntVar(&cfg.n, "n", 10000, "idle, connect: number of connections")
	flag.IntVar(&cfg.dialers, "c", 64, "concurrent dialers")
	flag.IntVar(&cfg.sessions, "sessions", 1000, "fanout: sessions, one connection each")
	flag.StringVar(&cfg.rates, "rate", "", "total msg/s; a comma list runs each rate (fanout default 20000; stream default 0 = as fast as possible)")
	flag.IntVar(&cfg.size, "size", 0, "message bytes (fanout default 64, stream default 1024)")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "fanout, stream: publishing time per run")
	flag.Int64Var(&cfg.count, "count", 0, "stream: messages per run instead of -duration")
	flag.IntVar(&cfg.runs, "runs", 3, "runs per measurement; the table shows each and the median")
	flag.IntVar(&cfg.publishers, "publishers", 4, "Redis publisher connections (pipelined)")
	flag.IntVar(&cfg.window, "window", 1000, "stream: most messages published but not yet received")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "idle: wait after connecting before reading memory")
	flag.IntVar(&cfg.srcIPs, "srcips", 1, "spread client connections over 127.0.0.1..127.0.0.N (for > 28k ports)")
	flag.BoolVar(&cfg.floor, "floor", true, "fanout, stream: also run a bare redigo subscriber")
	flag.DurationVar(&cfg.timeout, "timeout", 5*time.Minute, "bound on the whole run")
	flag.StringVar(&cfg.runID, "run", "", "baresub (internal): the parent's run id")
	flag.Parse()
	if !slices.Contains([]string{"idle", "connect", "fanout", "stream", "baresub"}, cfg.mode) {
		fatalf("-mode must be idle, connect, fanout or stream")
	}
	stream := cfg.mode == "stream"
	if cfg.size == 0 {
		cfg.size = map[bool]int{true: 1024, false: 64}[stream]
	}
	cfg.size = max(cfg.size, 32) // room for the quotes, the stamp and the sequence
	if cfg.rates == "" {
		cfg.rates = map[bool]string{true: "0", false: "20000"}[stream]
	}
	for _, s := range strings.Split(cfg.rates, ",") {
		r, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil || r < 0 {
			fatalf("-rate: %q is not a rate", s)
		}
		cfg.rateList = append(cfg.rateList, r)
	}
	if cfg.metrics == "" {
		cfg.metrics = strings.Replace(strings.TrimSuffix(cfg.proxy, "/"), "ws", "http", 1) + "/metrics"
	}
	if *pidfile != "" {
		b, err := os.ReadFile(*pidfile)
		if err != nil {
			fatalf("-pidfile: %v", err)
		}
		if cfg.pid, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
			fatalf("-pidfile %s: not a PID", *pidfile)
		}
	}
	for _, u := range []string{cfg.proxy, cfg.redis, cfg.metrics} {
		if !isLoopback(u) {
			fatalf("%s: only loopback addresses may be load-tested", u)
		}
	}
}

func main() {
	parseFlags()
	if cfg.mode == "baresub" {
		os.Exit(runBareSub())
	}
	raiseFileLimit()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	ctl, err := redis.DialURL(cfg.redis, redis.DialConnectTimeout(5*time.Second))
	if err != nil {
		fatalf("redis: %v", err)
	}
	lt := &loadTest{runID: "lt" + randomHex(4), token: randomHex(16), ctl: ctl, pid: cfg.pid}
	modes := map[string]func(context.Context) error{"idle": lt.idle, "connect": lt.connect, "fanout": lt.fanout, "stream": lt.stream}
	err = modes[cfg.mode](ctx)
	lt.cleanup()
	for _, t := range lt.tables {
		t.print(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

// loadTest holds one invocation's sessions, connections and counters.
type loadTest struct {
	runID, token string
	ctl          redis.Conn // sessions, cleanup and INFO; main goroutine only
	ids          []string   // sessions whose auth keys cleanup deletes
	pub          publishers
	bare         *bareSub
	proxy        *exec.Cmd     // the -spawn proxy, if any
	proxyExited  chan struct{} // closed when proxy has exited
	pid          int           // the proxy's, 0 = unknown
	readBuffer   int           // client read buffer beyond x/net/websocket's own, 0 = none
	clients      []*client
	readers      sync.WaitGroup
	tables       []*table

	// Of the clients: stamped messages received, of them out of sequence,
	// connections ended by the proxy, other frames (control errors), and the
	// time of the latest delivery (unix nanos).
	delivered, disorder, dropped, other, lastRecv atomic.Int64
}

// ---- the modes

func (lt *loadTest) idle(ctx context.Context) error {
	t := lt.newTable(fmt.Sprintf("idle: %d connections (RSS from %s)", cfg.n, lt.source()))
	return lt.dialRuns(ctx, func(r dialRun) {
		lt.startReaders(r.clients)
		if sleepCtx(ctx, cfg.settle); ctx.Err() != nil {
			return
		}
		run, before, after, k := r.run, r.before, lt.snapshot(), float64(len(r.clients))
		t.add(run, "connections established", "conns", k)
		t.add(run, "connections failed", "conns", float64(cfg.n)-k)
		t.add(run, "RSS per connection", "KiB", (after.rss-before.rss)/k/1024)
		t.add(run, "Go heap in use per connection", "KiB", (after.heap-before.heap)/k/1024)
		t.add(run, "Go stacks per connection", "KiB", (after.stack-before.stack)/k/1024)
		t.add(run, "goroutines per connection", "", (after.goroutines-before.goroutines)/k)
		t.add(run, "proxy RSS with connections", "MiB", after.rss/(1<<20))
		t.add(run, "handshake p99 while connecting", "ms", percentile(r.handshakes, 0.99))
		lt.pub.run(ctx, pace{count: int64(cfg.n)})
		waitUntil(ctx, 10*time.Second, func() bool { return lt.delivered.Load()-after.delivered >= int64(len(r.clients)) })
		received := 0
		for _, c := range r.clients {
			if c.received.Load() > 0 {
				received++
			}
		}
		t.add(run, "connections that received their message", "conns", float64(received))
		t.add(run, "connections closed by the proxy", "conns", float64(lt.dropped.Load()-before.dropped))
	})
}

func (lt *loadTest) connect(ctx context.Context) error {
	t := lt.newTable(fmt.Sprintf("connect: %d new connections, %d concurrent dialers", cfg.n, cfg.dialers))
	return lt.dialRuns(ctx, func(r dialRun) {
		run, before, after, k := r.run, r.before, lt.snapshot(), float64(len(r.clients))
		t.add(run, "connections established", "conns", k)
		t.add(run, "connections failed", "conns", float64(cfg.n)-k)
		t.add(run, "connection rate", "conns/s", k/r.elapsed.Seconds())
		t.add(run, "handshake p50", "ms", percentile(r.handshakes, 0.50))
		t.add(run, "handshake p90", "ms", percentile(r.handshakes, 0.90))
		t.add(run, "handshake p99", "ms", percentile(r.handshakes, 0.99))
		t.add(run, "handshake max", "ms", percentile(r.handshakes, 1))
		t.add(run, "proxy CPU", "µs/conn", (after.proxyCPU-before.proxyCPU)*1e6/k)
		t.add(run, "Redis CPU (whole server)", "µs/conn", (after.redisCPU-before.redisCPU)*1e6/k)
		t.add(run, "load generator CPU", "µs/conn", (after.ownCPU-before.ownCPU)*1e6/k)
		t.add(run, "other processes on the machine", "cores", otherCores(before, after))
	})
}

func (lt *loadTest) fanout(ctx context.Context) error {
	rates := cfg.rateList
	if err := lt.setup(ctx, cfg.sessions); err != nil {
		return err
	}
	// Warm up (stacks grown, heaps sized, in the proxy and here) unmeasured.
	lt.pub.run(ctx, pace{rate: rates[0], duration: min(cfg.duration, 2*time.Second)})
	summary := &table{title: "fanout: medians per rate"}
	for _, rate := range rates {
		t := lt.newTable(fmt.Sprintf("fanout: %d sessions, %d-byte messages, %.0f msg/s for %s (CPU from %s)",
			cfg.sessions, cfg.size, rate, cfg.duration, lt.source()))
		for run := 0; run < cfg.runs && ctx.Err() == nil; run++ {
			label := fmt.Sprintf("fanout %.0f msg/s run %d/%d", rate, run+1, cfg.runs)
			lt.measure(ctx, t, run, pace{rate: rate, duration: cfg.duration}, label)
		}
		for _, name := range []string{"published rate", "lost", "latency p99"} {
			summary.add(0, fmt.Sprintf("%s at %.0f msg/s", name, rate), t.row(name).unit, median(t.row(name).values))
		}
	}
	if len(rates) > 1 {
		lt.tables = append(lt.tables, summary)
	}
	return ctx.Err()
}

func (lt *loadTest) stream(ctx context.Context) error {
	lt.readBuffer = 256 << 10
	if err := lt.setup(ctx, 1); err != nil {
		return err
	}
	pc, length := pace{rate: cfg.rateList[0], duration: cfg.duration}, cfg.duration.String()
	if cfg.count > 0 {
		pc, length = pace{rate: cfg.rateList[0], count: cfg.count}, fmt.Sprint(cfg.count, " msgs")
	}
	// In flight: published minus the newest sequence number received, so that
	// a lost message does not shrink the window for good.
	publisher, receiver := lt.pub[0], lt.clients[0]
	pc.window = func() bool { return publisher.seq[0]-receiver.lastSeq.Load() < int64(cfg.window) }
	t := lt.newTable(fmt.Sprintf("stream: one session, %d-byte messages, rate %s, for %s (CPU from %s)",
		cfg.size, cfg.rates, length, lt.source()))
	for run := 0; run < cfg.runs && ctx.Err() == nil; run++ {
		if lt.dropped.Load() > 0 {
			return errors.New("the stream's connection was closed by the proxy; remaining runs skipped")
		}
		lt.measure(ctx, t, run, pc, fmt.Sprintf("stream run %d/%d", run+1, cfg.runs))
	}
	return ctx.Err()
}

// ---- the plumbing of the modes

// dialRun is one run of idle or connect.
type dialRun struct {
	run        int
	before     snapshot // taken just before dialling
	clients    []*client
	handshakes []time.Duration // sorted
	elapsed    time.Duration   // to establish them all
}

// dialRuns is idle and connect: it creates -n sessions, then -runs times
// starts a fresh -spawn proxy, connects a client to every session, hands the
// run to measure, closes the clients and waits until the proxy has let go of
// them.
func (lt *loadTest) dialRuns(ctx context.Context, measure func(dialRun)) error {
	if err := lt.createSessions(cfg.n); err != nil {
		return err
	}
	for run := 0; run < cfg.runs && ctx.Err() == nil; run++ {
		if err := lt.startProxy(ctx); err != nil {
			return err
		}
		r := dialRun{run: run, before: lt.snapshot()}
		start := time.Now()
		r.clients, r.handshakes = lt.dialAll(ctx, fmt.Sprintf("%s run %d/%d", cfg.mode, run+1, cfg.runs))
		if r.elapsed = time.Since(start); ctx.Err() == nil {
			measure(r)
		}
		lt.closeAll()
		lt.waitProxyIdle(ctx, r.before.active)
	}
	return ctx.Err()
}

// setup is fanout and stream before their runs: n sessions, the proxy, the
// bare subscriber and one client per session.
func (lt *loadTest) setup(ctx context.Context, n int) error {
	if err := lt.createSessions(n); err != nil {
		return err
	}
	if err := lt.startProxy(ctx); err != nil {
		return err
	}
	if cfg.floor {
		var err error
		if lt.bare, err = startBareSub(ctx, lt.runID, n); err != nil {
			return err
		}
	}
	clients, _ := lt.dialAll(ctx, "connecting")
	if len(clients) < n {
		return fmt.Errorf("only %d of %d connections established", len(clients), n)
	}
	lt.startReaders(clients)
	return ctx.Err()
}

// measure is one run of fanout or stream: publish pc, wait until the clients
// and the bare subscriber have received everything (or nothing moved for
// 2 s), and add the figures to t.
func (lt *loadTest) measure(ctx context.Context, t *table, run int, pc pace, label string) {
	// Start from rest: everything published so far has arrived (or is lost).
	waitUntil(ctx, 3*time.Second, func() bool {
		sent := lt.pub.sent()
		return lt.delivered.Load() >= sent && (lt.bare == nil || lt.bare.count() >= sent)
	})
	for _, c := range lt.clients {
		c.drainLatencies(nil)
	}
	b := lt.snapshot()
	stop := progress(ctx, func() string {
		return fmt.Sprintf("%s: published %d, delivered %d, bare subscriber %d",
			label, lt.pub.sent()-b.sent, lt.delivered.Load()-b.delivered, lt.bare.count()-b.bare)
	})
	start := time.Now()
	sent := lt.pub.run(ctx, pc)
	published := time.Since(start)
	last, lastMove := int64(-1), time.Now()
	waitUntil(ctx, 30*time.Second, func() bool {
		d, bare := lt.delivered.Load()-b.delivered, lt.bare.count()-b.bare
		if d+bare != last {
			last, lastMove = d+bare, time.Now()
		}
		return d >= sent && (lt.bare == nil || bare >= sent) || time.Since(lastMove) > 2*time.Second
	})
	stop()
	a := lt.snapshot()
	if ctx.Err() != nil {
		return // an interrupted run is not a measurement
	}
	var latency []time.Duration
	for _, c := range lt.clients {
		latency = c.drainLatencies(latency)
	}
	slices.Sort(latency)
	delivered, bare := a.delivered-b.delivered, a.bare-b.bare
	elapsed := time.Duration(lt.lastRecv.Load() - start.UnixNano()) // publish start to last delivery
	if elapsed <= 0 {
		elapsed = published
	}
	perMsg := func(seconds float64, n int64) float64 {
		if n <= 0 {
			return math.NaN()
		}
		return seconds * 1e6 / float64(n)
	}
	proxyCPU, bareCPU, bareLost := perMsg(a.proxyCPU-b.proxyCPU, delivered), perMsg(a.bareCPU-b.bareCPU, bare), math.NaN()
	if lt.bare != nil {
		bareLost = float64(sent - bare)
	}
	proxyMean, proxyP99 := proxyLatency(b.metrics, a.metrics)
	if cfg.mode == "stream" {
		t.add(run, "throughput", "MB/s", float64(delivered)*float64(cfg.size)/elapsed.Seconds()/1e6)
		t.add(run, "messages", "msg/s", float64(delivered)/elapsed.Seconds())
	} else {
		t.add(run, "published rate", "msg/s", float64(sent)/published.Seconds())
	}
	t.add(run, "delivered", "msgs", float64(delivered))
	t.add(run, "lost", "msgs", float64(sent-delivered))
	t.add(run, "out of order", "msgs", float64(a.disorder-b.disorder))
	t.add(run, "connections dropped by proxy", "conns", float64(a.dropped-b.dropped))
	t.add(run, "other frames (control errors)", "msgs", float64(a.other-b.other))
	t.add(run, "latency p50", "ms", percentile(latency, 0.5))
	t.add(run, "latency p99", "ms", percentile(latency, 0.99))
	t.add(run, "latency p999", "ms", percentile(latency, 0.999))
	t.add(run, "latency max", "ms", percentile(latency, 1))
	t.add(run, "  of which in the proxy: mean", "ms", proxyMean)
	t.add(run, "  of which in the proxy: p99 ≤", "ms", proxyP99)
	t.add(run, "proxy CPU", "µs/msg", proxyCPU)
	t.add(run, "bare redigo subscriber CPU", "µs/msg", bareCPU)
	t.add(run, "proxy / bare subscriber", "×", proxyCPU/bareCPU)
	t.add(run, "bare subscriber lost", "msgs", bareLost)
	t.add(run, "Redis CPU (whole server)", "µs/msg", perMsg(a.redisCPU-b.redisCPU, sent))
	t.add(run, "load generator CPU", "µs/msg", perMsg(a.ownCPU-b.ownCPU, sent))
	t.add(run, "proxy RSS at end", "MiB", a.rss/(1<<20))
	t.add(run, "other processes on the machine", "cores", otherCores(b, a))
}

// snapshot is everything a measurement takes the difference of.
type snapshot struct {
	at                                          time.Time
	proxyCPU, bareCPU, redisCPU, ownCPU, allCPU float64 // seconds; NaN when unknown
	rss, heap, stack, goroutines, active        float64 // the proxy's; NaN when unknown
	metrics                                     map[string]float64
	sent, bare                                  int64 // published; received by the bare subscriber
	delivered, disorder, dropped, other         int64 // see loadTest
}

func (lt *loadTest) snapshot() snapshot {
	m := scrape(cfg.metrics)
	get := func(name string) float64 {
		if v, ok := m[name]; ok {
			return v
		}
		return math.NaN()
	}
	s := snapshot{metrics: m, proxyCPU: get("process_cpu_seconds_total"), rss: get("process_resident_memory_bytes"),
		heap: get("go_memstats_heap_inuse_bytes"), stack: get("go_memstats_stack_inuse_bytes"),
		goroutines: get("go_goroutines"), active: get("wsproxy_active_connections"), bareCPU: math.NaN()}
	if lt.pid > 0 {
		s.proxyCPU, s.rss = procStat(lt.pid)
	}
	if lt.bare != nil {
		s.bareCPU, _ = procStat(lt.bare.cmd.Process.Pid)
	}
	s.redisCPU, s.ownCPU, s.allCPU = lt.redisCPU(), ownCPU(), machineCPU()
	s.sent, s.bare, s.delivered = lt.pub.sent(), lt.bare.count(), lt.delivered.Load()
	s.disorder, s.dropped, s.other, s.at = lt.disorder.Load(), lt.dropped.Load(), lt.other.Load(), time.Now()
	return s
}

// otherCores is what the rest of the machine used between a and b, in cores.
func otherCores(a, b snapshot) float64 {
	known := b.proxyCPU - a.proxyCPU + b.redisCPU - a.redisCPU + b.ownCPU - a.ownCPU
	if !math.IsNaN(a.bareCPU) {
		known += b.bareCPU - a.bareCPU
	}
	return (b.allCPU - a.allCPU - known) / b.at.Sub(a.at).Seconds()
}

// ---- clients

// client is one WebSocket connection: the TCP connection x/net/websocket
// reads and writes through (Read and Write below), and what its read loop
// has seen.
type client struct {
	net.Conn
	r          io.Reader // Conn, or a larger buffer over it
	dropOrigin bool      // until the handshake request, one write, has gone
	status     string    // the first line received: the handshake's status

	ws       *websocket.Conn
	received atomic.Int64
	lastSeq  atomic.Int64 // written by the read loop only
	closing  atomic.Bool
	mu       sync.Mutex
	latency  []time.Duration // recorded since the last drainLatencies
}

func (c *client) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if c.status == "" && n > 0 {
		line, _, _ := bytes.Cut(p[:n], []byte("\r\n"))
		c.status = string(line)
	}
	return n, err
}

// Write drops the Origin line, which x/net/websocket always writes, from the
// handshake request when no -origin is set.
func (c *client) Write(p []byte) (int, error) {
	if !c.dropOrigin {
		return c.Conn.Write(p)
	}
	c.dropOrigin = false
	request := p
	if i := bytes.Index(p, []byte("\r\nOrigin: ")); i >= 0 {
		end := bytes.Index(p[i+2:], []byte("\r\n"))
		request = append(p[:i:i], p[i+2+end:]...)
	}
	if _, err := c.Conn.Write(request); err != nil {
		return 0, err
	}
	return len(p), nil
}

// drainLatencies appends the latencies recorded so far to dst and forgets them.
func (c *client) drainLatencies(dst []time.Duration) []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	dst = append(dst, c.latency...)
	c.latency = c.latency[:0]
	return dst
}

// dialAll connects one client per session with -c concurrent dialers and
// returns the established clients and their handshake times, sorted.
func (lt *loadTest) dialAll(ctx context.Context, label string) ([]*client, []time.Duration) {
	var clients []*client
	var handshakes []time.Duration
	var next atomic.Int64
	var mu sync.Mutex
	failures := map[string]int{}
	stop := progress(ctx, func() string {
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("%s: connected %d/%d, failures %v", label, len(clients), len(lt.ids), failures)
	})
	var wg sync.WaitGroup
	for range cfg.dialers {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(lt.ids) && ctx.Err() == nil; i = int(next.Add(1)) - 1 {
				start := time.Now()
				c, err := lt.dial(ctx, lt.ids[i], i)
				took := time.Since(start)
				mu.Lock()
				if err != nil {
					failures[err.Error()]++
				} else {
					clients, handshakes = append(clients, c), append(handshakes, took)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	stop()
	if len(failures) > 0 {
		fmt.Fprintf(os.Stderr, "%s: %d failed: %v\n", label, len(lt.ids)-len(clients), failures)
	}
	lt.clients = append(lt.clients, clients...)
	slices.Sort(handshakes)
	return clients, handshakes
}

// dial connects a client to session id and completes the handshake (within
// 15 s); a refusal is reported by its HTTP status line.
func (lt *loadTest) dial(ctx context.Context, id string, i int) (*client, error) {
	origin := cfg.origin
	if origin == "" {
		origin = "http://unused.invalid" // x/net/websocket needs one; client.Write drops it
	}
	config, err := websocket.NewConfig(cfg.proxy+"/load/ws/"+id, origin)
	if err != nil {
		return nil, err
	}
	config.Header = http.Header{"Authorization": {"Bearer " + lt.token}}
	dialer := net.Dialer{Timeout: 15 * time.Second}
	if cfg.srcIPs > 1 {
		dialer.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%cfg.srcIPs))}
	}
	conn, err := dialer.DialContext(ctx, "tcp", config.Location.Host)
	if err != nil {
		return nil, err
	}
	c := &client{Conn: conn, r: conn, dropOrigin: cfg.origin == ""}
	if lt.readBuffer > 0 {
		// x/net/websocket reads through a fixed 4 KiB buffer: one system
		// call per four 1 KiB messages. A streaming client reads through a
		// larger one.
		c.r = bufio.NewReaderSize(conn, lt.readBuffer)
	}
	conn.SetDeadline(time.Now().Add(15 * time.Second))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	c.ws, err = websocket.NewClient(config, c)
	stop()
	if err != nil {
		conn.Close()
		if errors.Is(err, websocket.ErrBadStatus) {
			return nil, errors.New(c.status)
		}
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

// startReaders runs a read loop per client: it receives until the
// connection ends; receiving is also what answers the proxy's pings
// (x/net/websocket replies to them inside Receive).
func (lt *loadTest) startReaders(clients []*client) {
	for _, c := range clients {
		lt.readers.Go(func() {
			var msg []byte
			for {
				if err := websocket.Message.Receive(c.ws, &msg); err != nil {
					if !c.closing.Load() && lt.dropped.Add(1) == 1 {
						fmt.Fprintf(os.Stderr, "a connection ended: %v (after %d messages)\n", err, c.received.Load())
					}
					return
				}
				now := time.Now().UnixNano()
				stamp, seq, ok := parsePayload(msg)
				if !ok {
					if lt.other.Add(1) == 1 {
						fmt.Fprintf(os.Stderr, "first unrecognized message: %.120q\n", msg)
					}
					continue
				}
				c.mu.Lock()
				c.latency = append(c.latency, time.Duration(now-stamp))
				c.mu.Unlock()
				if seq != c.lastSeq.Load()+1 {
					lt.disorder.Add(1)
				}
				c.lastSeq.Store(seq)
				c.received.Add(1)
				lt.delivered.Add(1)
				lt.lastRecv.Store(now)
			}
		})
	}
}

// closeAll closes every client and waits for their read loops.
func (lt *loadTest) closeAll() {
	for _, c := range lt.clients {
		c.closing.Store(true)
		c.ws.Close()
	}
	lt.readers.Wait()
	lt.clients = nil
}

// waitProxyIdle waits until the proxy reports no more active connections
// than before the run, so that the next run starts from the same state.
func (lt *loadTest) waitProxyIdle(ctx context.Context, baseline float64) {
	if math.IsNaN(baseline) {
		sleepCtx(ctx, time.Second)
		return
	}
	waitUntil(ctx, 15*time.Second, func() bool {
		time.Sleep(90 * time.Millisecond)
		return scrape(cfg.metrics)["wsproxy_active_connections"] <= baseline
	})
	sleepCtx(ctx, 500*time.Millisecond)
}

// ---- sessions and publishers

func sessionID(runID string, i int) string { return fmt.Sprintf("%s-%d", runID, i) }
func downChannel(id string) string         { return "session:" + id + ":down" }

// createSessions writes n auth keys, pipelined 1,000 at a time, and the
// publishers for them.
func (lt *loadTest) createSessions(n int) error {
	ttl := int(cfg.timeout.Seconds()) + 600
	for i := range n {
		lt.ids = append(lt.ids, sessionID(lt.runID, i))
	}
	for batch := range slices.Chunk(lt.ids, 1000) {
		for _, id := range batch {
			lt.ctl.Send("SET", "session:"+id+":auth", lt.token, "EX", ttl)
		}
		err := lt.ctl.Flush()
		for range batch {
			if err == nil {
				_, err = lt.ctl.Receive()
			}
		}
		if err != nil {
			return fmt.Errorf("creating sessions: %w", err)
		}
	}
	var err error
	lt.pub, err = newPublishers(lt.ids)
	return err
}

// cleanup closes everything this run opened and deletes its session keys.
func (lt *loadTest) cleanup() {
	lt.closeAll()
	lt.bare.stop()
	lt.pub.close()
	lt.stopProxy()
	deleted := 0
	for batch := range slices.Chunk(lt.ids, 500) {
		var keys []any
		for _, id := range batch {
			keys = append(keys, "session:"+id+":auth")
		}
		n, err := redis.Int(lt.ctl.Do("DEL", keys...))
		if err != nil {
			fmt.Fprintf(os.Stderr, "cleanup: %v (keys session:%s-*:auth remain)\n", err, lt.runID)
			break
		}
		deleted += n
	}
	fmt.Fprintf(os.Stderr, "cleanup: deleted %d session keys of run %s\n", deleted, lt.runID)
	lt.ctl.Close()
}

// pace says how a publishing run goes: rate msg/s in total (0 = as fast as
// allowed) for duration and/or count messages; window, when set, holds
// publishing back while it returns false.
type pace struct {
	rate     float64
	duration time.Duration
	count    int64
	window   func() bool
}

// publishers are -publishers pipelined Redis connections; session i belongs
// to connection i mod n, so each session's messages stay in order.
type publishers []*publisher

type publisher struct {
	conn                  redis.Conn // Send and Flush by run, Receive by readReplies
	out                   *batchConn // conn's network connection
	channels              []string
	seq                   []int64 // the last sequence number sent, per channel
	next                  int
	payload               []byte
	share                 float64 // of all sessions
	sent, replied, failed atomic.Int64
	done                  chan struct{}
}

const maxInFlight = 50000 // unanswered PUBLISHes per connection before pausing

func newPublishers(ids []string) (publishers, error) {
	var pp publishers
	n := min(cfg.publishers, len(ids))
	for i := range n {
		p := &publisher{done: make(chan struct{})}
		conn, err := redis.DialURL(cfg.redis, redis.DialNetDial(func(network, addr string) (net.Conn, error) {
			c, err := net.Dial(network, addr)
			if err != nil {
				return nil, err
			}
			p.out = &batchConn{Conn: c, w: bufio.NewWriterSize(c, 256<<10)}
			return p.out, nil
		}))
		if err != nil {
			pp.close()
			return nil, fmt.Errorf("publisher: %w", err)
		}
		p.conn = conn
		for j := i; j < len(ids); j += n {
			p.channels = append(p.channels, downChannel(ids[j]))
		}
		p.seq, p.share = make([]int64, len(p.channels)), float64(len(p.channels))/float64(len(ids))
		pp = append(pp, p)
		go p.readReplies()
	}
	return pp, nil
}

// run publishes pc over all connections and returns the number sent.
func (pp publishers) run(ctx context.Context, pc pace) int64 {
	var wg sync.WaitGroup
	var total atomic.Int64
	for _, p := range pp {
		wg.Go(func() { total.Add(p.run(ctx, pc)) })
	}
	wg.Wait()
	return total.Load()
}

func (pp publishers) sent() (n int64) {
	for _, p := range pp {
		n += p.sent.Load()
	}
	return n
}

// close waits (briefly) for outstanding replies, then closes the connections.
func (pp publishers) close() {
	for _, p := range pp {
		waitUntil(context.Background(), 5*time.Second, func() bool { return p.replied.Load() >= p.sent.Load() })
		if f := p.failed.Load(); f > 0 {
			fmt.Fprintf(os.Stderr, "publisher: %d PUBLISH errors\n", f)
		}
		p.conn.Close()
		<-p.done
	}
}

// run publishes this connection's share of pc, in batches of at most 1,024
// commands per write, on a 1 ms ticker when a rate is set (catching up when
// a tick comes late, so that the rate holds on a busy machine).
func (p *publisher) run(ctx context.Context, pc pace) int64 {
	rate, limit := pc.rate*p.share, int64(math.Round(float64(pc.count)*p.share))
	var tick <-chan time.Time
	if rate > 0 {
		ticker := time.NewTicker(time.Millisecond)
		defer ticker.Stop()
		tick = ticker.C
	}
	start := time.Now()
	var sent int64
	for ctx.Err() == nil {
		elapsed := time.Since(start)
		if pc.duration > 0 && elapsed >= pc.duration || limit > 0 && sent >= limit {
			break
		}
		batch := int64(256)
		if rate > 0 {
			batch = int64(rate*elapsed.Seconds()) - sent
		}
		if limit > 0 {
			batch = min(batch, limit-sent)
		}
		if p.sent.Load()-p.replied.Load() > maxInFlight || pc.window != nil && !pc.window() {
			batch = 0
		}
		if batch = min(batch, 1024); batch > 0 {
			p.out.batching = true
			for range batch {
				p.next = (p.next + 1) % len(p.channels)
				p.seq[p.next]++
				p.payload = appendPayload(p.payload[:0], time.Now().UnixNano(), p.seq[p.next])
				p.conn.Send("PUBLISH", p.channels[p.next], p.payload) // errors surface in Flush
			}
			p.sent.Add(batch)
			sent += batch
			err := p.conn.Flush()
			if err == nil {
				err = p.out.flush()
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "publisher:", err)
				return sent
			}
		}
		if tick != nil {
			select {
			case <-tick:
			case <-ctx.Done():
			}
		} else if batch <= 0 {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return sent
}

// batchConn lets a batch of pipelined commands leave in one write: redigo
// flushes its 4 KiB buffer into w whenever it fills, and flush sends it all.
type batchConn struct {
	net.Conn
	w        *bufio.Writer
	batching bool // set by the publisher around each batch
}

func (c *batchConn) Write(p []byte) (int, error) {
	if c.batching {
		return c.w.Write(p)
	}
	return c.Conn.Write(p)
}

func (c *batchConn) flush() error {
	c.batching = false
	return c.w.Flush()
}

// readReplies counts PUBLISH replies until the connection is closed.
func (p *publisher) readReplies() {
	defer close(p.done)
	for {
		if _, err := p.conn.Receive(); err != nil {
			if _, isReply := err.(redis.Error); !isReply {
				return
			}
			p.failed.Add(1)
		}
		p.replied.Add(1)
	}
}

// appendPayload builds `"<unix nanos> <seq> xxx…"`, -size bytes of valid JSON.
func appendPayload(b []byte, stamp, seq int64) []byte {
	b = append(b, '"')
	b = strconv.AppendInt(b, stamp, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, ' ')
	for len(b) < cfg.size-1 {
		b = append(b, 'x')
	}
	return append(b, '"')
}

// parsePayload reads the stamp and sequence number back, without allocating.
func parsePayload(m []byte) (stamp, seq int64, ok bool) {
	if len(m) < 2 || m[0] != '"' {
		return 0, 0, false
	}
	i := 1
	number := func() (n int64, ok bool) {
		start := i
		for ; i < len(m) && m[i] >= '0' && m[i] <= '9'; i++ {
			n = n*10 + int64(m[i]-'0')
		}
		ok = i > start && i < len(m) && m[i] == ' '
		i++
		return n, ok
	}
	stamp, ok1 := number()
	seq, ok2 := number()
	return stamp, seq, ok1 && ok2
}

// ---- the floor: a bare redigo subscriber in a child process

type bareSub struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	received atomic.Int64
}

// startBareSub runs `loadtest -mode baresub` on the same down channels and
// waits until it has confirmed every subscription. The child prints
// "ready", then its running message count every 50 ms until stdin closes.
func startBareSub(ctx context.Context, runID string, sessions int) (*bareSub, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b := &bareSub{cmd: exec.Command(exe, "-mode", "baresub", "-redis", cfg.redis, "-run", runID,
		"-sessions", strconv.Itoa(sessions), "-proxy", cfg.proxy)}
	b.cmd.Stderr = os.Stderr
	stdout, err := b.cmd.StdoutPipe()
	if err == nil {
		b.stdin, err = b.cmd.StdinPipe()
	}
	if err == nil {
		err = b.cmd.Start()
	}
	if err != nil {
		return nil, fmt.Errorf("bare subscriber: %w", err)
	}
	// Until "ready", a timeout or ctx kills it, which ends the scan.
	kill := time.AfterFunc(30*time.Second, func() { b.cmd.Process.Kill() })
	stopKill := context.AfterFunc(ctx, func() { b.cmd.Process.Kill() })
	lines := bufio.NewScanner(stdout)
	ready := lines.Scan() && lines.Text() == "ready"
	kill.Stop()
	stopKill()
	if !ready {
		b.stop()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("bare subscriber: %q instead of \"ready\" (it is killed after 30 s)", lines.Text())
	}
	go func() {
		for lines.Scan() {
			if n, err := strconv.ParseInt(lines.Text(), 10, 64); err == nil {
				b.received.Store(n)
			}
		}
	}()
	return b, nil
}

func (b *bareSub) count() int64 {
	if b == nil {
		return 0
	}
	return b.received.Load()
}

// stop closes the child's stdin, which ends it; it is killed after 3 s.
func (b *bareSub) stop() {
	if b == nil {
		return
	}
	b.stdin.Close()
	kill := time.AfterFunc(3*time.Second, func() { b.cmd.Process.Kill() })
	b.cmd.Wait()
	kill.Stop()
}

// runBareSub is the child (-mode baresub).
func runBareSub() int {
	conn, err := redis.DialURL(cfg.redis)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	psc := redis.PubSubConn{Conn: conn}
	for start := 0; start < cfg.sessions; start += 1000 {
		var channels []any
		for i := start; i < min(start+1000, cfg.sessions); i++ {
			channels = append(channels, downChannel(sessionID(cfg.runID, i)))
		}
		if err := psc.Subscribe(channels...); err != nil {
			fmt.Println(err)
			return 1
		}
	}
	for confirmed := 0; confirmed < cfg.sessions; {
		switch v := psc.Receive().(type) {
		case redis.Subscription:
			confirmed++
		case error:
			fmt.Println(v)
			return 1
		}
	}
	fmt.Println("ready")
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	var received atomic.Int64
	go func() {
		for range time.Tick(50 * time.Millisecond) {
			fmt.Println(received.Load())
		}
	}()
	for {
		switch v := psc.Receive().(type) {
		case redis.Message:
			received.Add(1)
		case error:
			fmt.Fprintln(os.Stderr, "baresub:", v)
			return 1
		}
	}
}

// ---- the proxy and what everything costs

// startProxy (re)starts the -spawn proxy and waits until it is ready.
func (lt *loadTest) startProxy(ctx context.Context) error {
	if cfg.spawn == "" {
		return nil
	}
	lt.stopProxy()
	u, _ := url.Parse(cfg.proxy)
	cmd := exec.Command(cfg.spawn)
	cmd.Env = append([]string{"LOG_LEVEL=warn"}, os.Environ()...)
	cmd.Env = append(cmd.Env, "HOST=127.0.0.1", "PORT="+u.Port(), "REDIS_URL="+cfg.redis)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("-spawn: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }() // stopProxy waits for it
	lt.proxy, lt.proxyExited, lt.pid = cmd, exited, cmd.Process.Pid
	ready := strings.TrimSuffix(cfg.metrics, "/metrics") + "/ready"
	waitUntil(ctx, 10*time.Second, func() bool {
		select {
		case <-exited: // e.g. the port is taken: do not measure whoever has it
			return true
		default:
		}
		resp, err := metricsClient.Get(ready)
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	})
	select {
	case <-exited:
		return fmt.Errorf("-spawn: %s exited: %v", cfg.spawn, cmd.ProcessState)
	default:
		return ctx.Err()
	}
}

// stopProxy ends the -spawn proxy with SIGTERM (SIGKILL after 10 s).
func (lt *loadTest) stopProxy() {
	if lt.proxy == nil {
		return
	}
	lt.proxy.Process.Signal(syscall.SIGTERM)
	select {
	case <-lt.proxyExited:
	case <-time.After(10 * time.Second):
		lt.proxy.Process.Kill()
		<-lt.proxyExited
	}
	lt.proxy = nil
}

// source says where the proxy's CPU and RSS come from.
func (lt *loadTest) source() string {
	switch {
	case cfg.spawn != "":
		return "/proc of the -spawn proxy"
	case lt.pid > 0:
		return fmt.Sprintf("/proc/%d", lt.pid)
	}
	return cfg.metrics
}

var metricsClient = &http.Client{Timeout: 5 * time.Second}

// scrape reads Prometheus text format into series (name with labels) ->
// value; nil if the proxy does not answer.
func scrape(url string) map[string]float64 {
	resp, err := metricsClient.Get(url)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	for lines := bufio.NewScanner(resp.Body); lines.Scan(); {
		line := lines.Text()
		i := strings.LastIndexByte(line, ' ') // the proxy writes no timestamps
		if line == "" || line[0] == '#' || i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m
}

// proxyLatency is the mean and the p99 bucket bound, in ms, of the proxy's
// own wsproxy_delivery_latency_seconds (Redis receive -> frame written)
// between two scrapes: it tells queueing in the proxy from queueing elsewhere.
func proxyLatency(before, after map[string]float64) (mean, p99 float64) {
	const name = "wsproxy_delivery_latency_seconds"
	count := after[name+"_count"] - before[name+"_count"]
	if after == nil || count <= 0 {
		return math.NaN(), math.NaN()
	}
	p99 = math.Inf(1)
	for series, v := range after {
		le, ok := strings.CutPrefix(series, name+`_bucket{le="`)
		bound, err := strconv.ParseFloat(strings.TrimSuffix(le, `"}`), 64)
		if ok && err == nil && v-before[series] >= 0.99*count {
			p99 = min(p99, bound*1000)
		}
	}
	return (after[name+"_sum"] - before[name+"_sum"]) / count * 1000, p99
}

// procStat is a process's user+system CPU seconds and its RSS in bytes,
// from /proc/PID/stat (fields 14, 15 and 24; clock ticks of 1/100 s).
func procStat(pid int) (cpu, rss float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return math.NaN(), math.NaN()
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:])) // the name may hold spaces
	if len(f) < 22 {
		return math.NaN(), math.NaN()
	}
	user, _ := strconv.ParseFloat(f[11], 64)
	sys, _ := strconv.ParseFloat(f[12], 64)
	pages, _ := strconv.ParseFloat(f[21], 64)
	return (user + sys) / 100, pages * float64(os.Getpagesize())
}

// machineCPU is the CPU seconds all processes have used (/proc/stat, all
// but idle and iowait).
func machineCPU() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return math.NaN()
	}
	line, _, _ := strings.Cut(string(b), "\n")
	busy := 0.0
	for i, field := range strings.Fields(line)[1:] {
		if v, err := strconv.ParseFloat(field, 64); err == nil && i != 3 && i != 4 {
			busy += v
		}
	}
	return busy / 100
}

func ownCPU() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// redisCPU is the Redis server's used_cpu_sys + used_cpu_user (INFO cpu).
func (lt *loadTest) redisCPU() float64 {
	info, err := redis.String(lt.ctl.Do("INFO", "cpu"))
	if err != nil {
		return math.NaN()
	}
	total := 0.0
	for _, line := range strings.Split(info, "\r\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && (k == "used_cpu_sys" || k == "used_cpu_user") {
			f, _ := strconv.ParseFloat(v, 64)
			total += f
		}
	}
	return total
}

// ---- the tables

// table is one measurement: a row per figure, a value per run.
type table struct {
	title string
	rows  []*row
}

type row struct {
	name, unit string
	values     []float64 // NaN = not measured
}

func (lt *loadTest) newTable(title string) *table {
	t := &table{title: title}
	lt.tables = append(lt.tables, t)
	return t
}

func (t *table) row(name string) *row {
	for _, r := range t.rows {
		if r.name == name {
			return r
		}
	}
	return &row{}
}

func (t *table) add(run int, name, unit string, v float64) {
	r := t.row(name)
	if r.name == "" {
		r = &row{name: name, unit: unit}
		t.rows = append(t.rows, r)
	}
	for len(r.values) <= run {
		r.values = append(r.values, math.NaN())
	}
	r.values[run] = v
}

// print writes the table with a column per run (unless there is one) and the median.
func (t *table) print(w io.Writer) {
	runs := 0
	for _, r := range t.rows {
		runs = max(runs, len(r.values))
	}
	if runs == 0 {
		return // interrupted before its first run
	} else if runs == 1 {
		runs = 0 // the median column says it all
	}
	fmt.Fprintf(w, "\n%s\n", t.title)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "figure\tunit\t")
	for i := range runs {
		fmt.Fprintf(tw, "run %d\t", i+1)
	}
	fmt.Fprintln(tw, "median\t")
	for _, r := range t.rows {
		fmt.Fprintf(tw, "%s\t%s\t", r.name, r.unit)
		for i := range runs {
			v := math.NaN()
			if i < len(r.values) {
				v = r.values[i]
			}
			fmt.Fprintf(tw, "%s\t", formatValue(v))
		}
		fmt.Fprintf(tw, "%s\t\n", formatValue(median(r.values)))
	}
	tw.Flush()
}

func median(values []float64) float64 {
	s := slices.DeleteFunc(slices.Clone(values), math.IsNaN)
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	return (s[(len(s)-1)/2] + s[len(s)/2]) / 2
}

// percentile is the nearest-rank q-quantile of sorted durations, in ms.
func percentile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	return float64(sorted[max(int(math.Ceil(q*float64(len(sorted))))-1, 0)]) / 1e6
}

func formatValue(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "n/a"
	case a >= 100 || v == math.Trunc(v):
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// ---- small helpers

// progress prints status to stderr every second until stop is called.
func progress(ctx context.Context, status func() string) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		ticker := time.NewTicker(time.Second)
		defer ticker.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
				fmt.Fprintln(os.Stderr, status())
			}
		}
	}()
	return func() { cancel(); <-done }
}

// waitUntil polls cond every 10 ms until it holds, limit passes or ctx ends.
func waitUntil(ctx context.Context, limit time.Duration, cond func() bool) {
	for deadline := time.Now().Add(limit); !cond() && ctx.Err() == nil && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}

// raiseFileLimit lifts RLIMIT_NOFILE's soft limit to the hard one: every
// client connection is a file descriptor.
func raiseFileLimit() {
	var r syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r) == nil && r.Cur < r.Max {
		r.Cur = r.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	}
}

func isLoopback(rawURL string) bool {
	u, err := url.Parse(rawURL)
	if err != nil {
		return false
	}
	ip := net.ParseIP(u.Hostname())
	return u.Hostname() == "localhost" || ip != nil && ip.IsLoopback()
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadtest: "+format+"\n", args...)
	os.Exit(2)
}
