// Command loadtest drives a wsproxy on this machine (loopback addresses only)
// with sessions of its own and reports memory per connection, connection
// rate, delivery latency and CPU per message, each measurement -runs times:
// every run and the median.
//
// Sessions: it writes session:{id}:auth = a random token to Redis, connects
// as /load/ws/{id} with "Authorization: Bearer <token>" and no Origin header
// unless -origin is set (a refused handshake counts as failed, under its HTTP
// status line), publishes to session:{id}:down itself, and deletes the auth
// keys at the end, also on Ctrl+C or -timeout. A message is a JSON string
// "<unix nanos> <sequence> xxx…" of -size bytes; its latency PUBLISH ->
// WebSocket receive comes from the stamp, and every latency of a run is kept,
// so the percentiles are exact (nearest rank). Four pipelined Redis
// connections publish, each owning every fourth session so that a session's
// messages stay in order, at most 1,024 PUBLISHes per write; at a rate, each
// sends its share on a 1 ms ticker and catches up on late ticks.
//
//	idle     Connect -n clients, -c at a time, wait 2 s, and divide the growth
//	         of the proxy's RSS, Go heap and stacks (go_memstats_heap_inuse_bytes,
//	         go_memstats_stack_inuse_bytes) by the connections established;
//	         then publish one message to every session and count the
//	         connections that received it.
//	connect  Connect -n clients with -c concurrent dialers: connections per
//	         second over the whole batch, handshake latency (dial to 101).
//	fanout   One client on each of -sessions sessions. After a 2 s warm-up,
//	         publish -size byte messages round robin at -rate msg/s in total
//	         for -duration: delivered, lost, latency, CPU per message. A comma
//	         list of rates runs each in turn, then prints the medians per rate.
//	stream   One session, its client reading through a 256 KiB buffer: for
//	         -duration, publish as fast as the client takes the messages, at
//	         most 1,000 published but not yet received. MB/s over publish
//	         start to last delivery, msg/s, CPU per message, lost.
//
// CPU per message is the proxy's user+system time over the run (/proc/PID/stat
// before and after) divided by the messages delivered to the clients. fanout
// and stream also run a bare redigo subscriber on the same channels, this
// program with -mode baresub as a child process: its CPU (/proc/PID/stat
// likewise) per message it received is the floor, and proxy / bare the
// proxy's overhead. Redis's CPU (INFO cpu) and this program's (/proc/self/stat)
// are shown too; "other processes" is the machine's CPU (/proc/stat) minus
// those four, in cores: how noisy the run was. The proxy's own delivery
// latency (Redis receive -> frame written) is the difference of its
// wsproxy_delivery_latency_seconds histogram over the run: the mean, and the
// smallest bucket bound that holds 99 %.
//
// -spawn BIN starts a fresh proxy for every idle and connect run and one for
// fanout and stream (HOST=127.0.0.1, PORT and REDIS_URL from -proxy and
// -redis, LOG_LEVEL=warn unless set); -pid names one started by hand; with
// neither, the proxy's CPU and RSS come from its /metrics. The commands behind
// the README's figures, from the repository root:
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
	"cmp"
	"context"
	"crypto/rand"
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

const (
	publishers   = 4               // pipelined Redis connections that publish
	maxBatch     = 1024            // PUBLISHes per write
	streamWindow = 1000            // stream: most messages published but not yet received
	settle       = 2 * time.Second // idle: wait after connecting, before reading memory
	warmUp       = 2 * time.Second // fanout: unmeasured publishing before the first run
)

var (
	mode     = flag.String("mode", "", "idle | connect | fanout | stream")
	proxyURL = flag.String("proxy", "ws://127.0.0.1:8080", "proxy base URL (loopback only)")
	redisURL = flag.String("redis", "redis://127.0.0.1:6379", "Redis URL (loopback only)")
	origin   = flag.String("origin", "", "Origin header for the clients (default none); with one, a refusal may come as a 101\nand a close frame, counted as a connection closed by the proxy")
	spawn    = flag.String("spawn", "", "proxy binary to start: a fresh process for every idle and connect run, one for fanout and stream")
	pid      = flag.Int("pid", 0, "PID of a proxy started by hand: its CPU and RSS from /proc")
	conns    = flag.Int("n", 10000, "idle, connect: number of connections")
	dialers  = flag.Int("c", 64, "concurrent dialers")
	sessions = flag.Int("sessions", 1000, "fanout: sessions, one connection each")
	rateList = flag.String("rate", "20000", "fanout: total msg/s; a comma list runs each rate")
	size     = flag.Int("size", 0, "message bytes (fanout default 64, stream default 1024)")
	duration = flag.Duration("duration", 10*time.Second, "fanout, stream: publishing time per run")
	runs     = flag.Int("runs", 3, "runs per measurement")
	timeout  = flag.Duration("timeout", 5*time.Minute, "bound on the whole run")
	runID    = flag.String("run", "", "baresub (internal): the parent's run id")

	metricsURL string // the proxy's, derived from -proxy
)

func main() {
	flag.Parse()
	if *mode == "baresub" {
		os.Exit(runBareSub())
	}
	n, ok := map[string]int{"idle": *conns, "connect": *conns, "fanout": *sessions, "stream": 1}[*mode]
	if !ok || n < 1 {
		fatalf("-mode must be idle, connect, fanout or stream, with at least one session")
	}
	*size = max(cmp.Or(*size, map[bool]int{true: 1024, false: 64}[*mode == "stream"]), 32) // room for stamp and sequence
	var rates []float64
	for _, s := range strings.Split(*rateList, ",") {
		if r, err := strconv.ParseFloat(strings.TrimSpace(s), 64); err == nil && r > 0 {
			rates = append(rates, r)
		} else {
			fatalf("-rate: %q is not a rate", s)
		}
	}
	metricsURL = strings.Replace(strings.TrimSuffix(*proxyURL, "/"), "ws", "http", 1) + "/metrics"
	if !isLoopback(*proxyURL) || !isLoopback(*redisURL) {
		fatalf("only loopback addresses may be load-tested")
	}
	var limit syscall.Rlimit // every connection is a file descriptor
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &limit) == nil {
		limit.Cur = limit.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &limit)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	ctl, err := redis.DialURL(*redisURL, redis.DialConnectTimeout(5*time.Second))
	if err != nil {
		fatalf("redis: %v", err)
	}
	lt := &loadTest{runID: "lt" + rand.Text()[:8], token: rand.Text(), ctl: ctl, pid: *pid, stopProxy: func() {}}
	for i := range n {
		lt.ids = append(lt.ids, sessionID(lt.runID, i))
	}
	ttl := int(timeout.Seconds()) + 600
	if _, err = lt.pipeline("SET", func(id string) []any { return []any{authKey(id), lt.token, "EX", ttl} }); err == nil {
		switch *mode {
		case "idle", "connect":
			_, err = repeat(ctx, fmt.Sprintf("%s: %d connections, %d dialers", *mode, n, *dialers), lt.dialRun)
		case "fanout", "stream":
			err = lt.deliver(ctx, rates)
		}
	}
	lt.cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

// loadTest is one invocation's sessions, processes, connections and counters.
type loadTest struct {
	runID, token string
	ctl          redis.Conn // sessions, INFO, cleanup; main goroutine only
	ids          []string
	pubs         []*publisher
	bare         *exec.Cmd // the bare subscriber, in fanout and stream
	stopProxy    func()    // ends the -spawn proxy, if any, and waits for it
	pid          int       // the proxy's, 0 = unknown
	readBuffer   int       // client read buffer beyond x/net/websocket's own, 0 = none
	clients      []*client
	mu           sync.Mutex
	latency      []time.Duration // of every message received since takeLatencies
	unrecognized sync.Once

	// Messages published, received by the bare subscriber, received by the
	// clients, of them out of sequence; connections ended by the proxy; the
	// latest delivery (unix nanos).
	published, bareReceived, delivered, disorder, dropped, lastRecv atomic.Int64
}

// repeat runs a measurement -runs times (fewer if ctx ends or it fails),
// prints the table of the runs, and returns the medians.
func repeat(ctx context.Context, title string, run func(context.Context) ([]figure, error)) (map[string]figure, error) {
	var results [][]figure
	var err error
	for i := 0; i < *runs && ctx.Err() == nil && err == nil; i++ {
		fmt.Fprintf(os.Stderr, "%s: run %d of %d\n", title, i+1, *runs)
		var f []figure
		if f, err = run(ctx); f != nil && ctx.Err() == nil {
			results = append(results, f)
		}
	}
	return report(title, results), cmp.Or(err, ctx.Err())
}

// dialRun is one run of idle or connect: start a fresh -spawn proxy, connect
// a client to every session, measure, close the clients and wait until the
// proxy has let go of them.
func (lt *loadTest) dialRun(ctx context.Context) ([]figure, error) {
	if err := lt.startProxy(ctx); err != nil {
		return nil, err
	}
	b, start := lt.snapshot(), time.Now()
	clients, handshakes := lt.dialAll(ctx)
	elapsed, k := time.Since(start), float64(len(clients))
	f := []figure{{"connections established", "conns", k}, {"connections failed", "conns", float64(len(lt.ids)) - k}}
	if *mode == "connect" {
		f = append(f, figure{"connection rate", "conns/s", k / elapsed.Seconds()},
			figure{"handshake p50", "ms", percentile(handshakes, 0.50)},
			figure{"handshake p99", "ms", percentile(handshakes, 0.99)})
		f = append(f, cpuFigures(b, lt.snapshot(), "µs/conn", k, k)...)
	} else {
		lt.startReaders(clients)
		waitUntil(ctx, settle, func() bool { return false })
		a := lt.snapshot()
		perConn := func(metric string) float64 { return (a[metric] - b[metric]) / k }
		f = append(f, figure{"RSS per connection", "KiB", perConn("process_resident_memory_bytes") / 1024},
			figure{"Go heap in use per connection", "KiB", perConn("go_memstats_heap_inuse_bytes") / 1024},
			figure{"Go stacks per connection", "KiB", perConn("go_memstats_stack_inuse_bytes") / 1024},
			figure{"goroutines per connection", "", perConn("go_goroutines")})
		lt.pipeline("PUBLISH", func(id string) []any {
			return []any{downChannel(id), appendPayload(nil, time.Now().UnixNano(), 1)}
		})
		waitUntil(ctx, 10*time.Second, func() bool { return float64(lt.delivered.Load())-a["delivered"] >= k })
		received := 0
		for _, c := range clients {
			if c.received.Load() > 0 {
				received++
			}
		}
		f = append(f, figure{"connections that received their message", "conns", float64(received)},
			figure{"connections closed by the proxy", "conns", float64(lt.dropped.Load()) - b["dropped"]})
	}
	lt.closeAll()
	waitUntil(ctx, 15*time.Second, func() bool {
		time.Sleep(90 * time.Millisecond)
		return !(scrape()["wsproxy_active_connections"] > b["wsproxy_active_connections"])
	})
	return f, nil
}

// deliver is fanout and stream: one proxy, the bare subscriber, the
// publishers and a client per session for all the runs, at each rate.
func (lt *loadTest) deliver(ctx context.Context, rates []float64) error {
	pc := pace{duration: *duration}
	if *mode == "stream" {
		rates = []float64{0}
		lt.readBuffer = 256 << 10 // x/net/websocket alone reads 4 KiB per system call
	}
	if err := lt.startProxy(ctx); err != nil {
		return err
	} else if err := lt.startBareSub(ctx); err != nil {
		return err
	} else if err := lt.openPublishers(); err != nil {
		return err
	} else if clients, _ := lt.dialAll(ctx); len(clients) < len(lt.ids) {
		return fmt.Errorf("only %d of %d connections established", len(clients), len(lt.ids))
	}
	lt.startReaders(lt.clients)
	if *mode == "stream" {
		// In flight: published minus the newest sequence number received, so
		// that a lost message does not shrink the window for good.
		p, c := lt.pubs[0], lt.clients[0]
		pc.window = func() bool { return p.seq[0]-c.lastSeq.Load() < streamWindow }
	} else {
		// Warm up (stacks grown, heaps sized, in the proxy and here) unmeasured.
		lt.publishAll(ctx, pace{rate: rates[0], duration: min(*duration, warmUp)})
	}
	var summary []figure
	for _, rate := range rates {
		pc.rate = rate
		title := fmt.Sprintf("fanout: %d sessions, %d-byte messages, %.0f msg/s for %s", len(lt.ids), *size, pc.rate, *duration)
		if *mode == "stream" {
			title = fmt.Sprintf("stream: one session, %d-byte messages, as fast as possible for %s", *size, *duration)
		}
		medians, err := repeat(ctx, title, func(ctx context.Context) ([]figure, error) {
			if *mode == "stream" && lt.dropped.Load() > 0 {
				return nil, errors.New("the stream's connection was closed by the proxy; remaining runs skipped")
			}
			return lt.measure(ctx, pc), nil
		})
		if err != nil {
			return err
		}
		for _, name := range []string{"published rate", "lost", "latency p99"} {
			summary = append(summary, figure{fmt.Sprintf("%s at %.0f msg/s", name, pc.rate), medians[name].unit, medians[name].value})
		}
	}
	if len(rates) > 1 {
		report("fanout: medians per rate", [][]figure{summary})
	}
	return nil
}

// measure is one run of fanout or stream: publish pc, wait until the clients
// and the bare subscriber have received everything (or nothing moved for
// 2 s), and return the figures.
func (lt *loadTest) measure(ctx context.Context, pc pace) []figure {
	waitUntil(ctx, 3*time.Second, func() bool { // from rest: all published so far arrived or is lost
		sent := lt.published.Load()
		return lt.delivered.Load() >= sent && lt.bareReceived.Load() >= sent
	})
	lt.takeLatencies()
	b, start := lt.snapshot(), time.Now()
	sent := float64(lt.publishAll(ctx, pc))
	published := time.Since(start)
	last, lastMove := -1.0, time.Now()
	waitUntil(ctx, 30*time.Second, func() bool {
		d, bare := float64(lt.delivered.Load())-b["delivered"], float64(lt.bareReceived.Load())-b["bare"]
		if d+bare != last {
			last, lastMove = d+bare, time.Now()
		}
		return d >= sent && bare >= sent || time.Since(lastMove) > 2*time.Second
	})
	a, latency := lt.snapshot(), lt.takeLatencies()
	slices.Sort(latency)
	delivered := a["delivered"] - b["delivered"]
	elapsed := time.Duration(lt.lastRecv.Load() - start.UnixNano()) // publish start to last delivery
	if elapsed <= 0 {
		elapsed = published
	}
	proxyMean, proxyP99 := proxyLatency(b, a)
	f := []figure{{"published rate", "msg/s", sent / published.Seconds()}}
	if *mode == "stream" {
		f = []figure{{"throughput", "MB/s", delivered * float64(*size) / elapsed.Seconds() / 1e6},
			{"messages", "msg/s", delivered / elapsed.Seconds()}}
	}
	f = append(f, figure{"delivered", "msgs", delivered},
		figure{"lost", "msgs", sent - delivered},
		figure{"out of order", "msgs", a["disorder"] - b["disorder"]},
		figure{"connections closed by the proxy", "conns", a["dropped"] - b["dropped"]},
		figure{"latency p50", "ms", percentile(latency, 0.5)},
		figure{"latency p99", "ms", percentile(latency, 0.99)},
		figure{"latency p999", "ms", percentile(latency, 0.999)},
		figure{"latency max", "ms", percentile(latency, 1)},
		figure{"  of which in the proxy: mean", "ms", proxyMean},
		figure{"  of which in the proxy: p99 ≤", "ms", proxyP99},
		figure{"bare subscriber lost", "msgs", sent - (a["bare"] - b["bare"])})
	return append(f, cpuFigures(b, a, "µs/msg", delivered, sent)...)
}

// cpuFigures is the CPU rows between snapshots b and a: the proxy's per item
// delivered, the bare subscriber's per message it received, Redis's and the
// load generator's per item sent, and the rest of the machine in cores.
func cpuFigures(b, a map[string]float64, unit string, delivered, sent float64) []figure {
	d := func(key string) float64 { return a[key] - b[key] }
	proxy, bare := d("process_cpu_seconds_total")*1e6/delivered, d("bare cpu")*1e6/d("bare")
	other := d("machine cpu") - d("process_cpu_seconds_total") - d("bare cpu") - d("redis cpu") - d("own cpu")
	f := []figure{{"proxy CPU", unit, proxy}}
	if _, ok := a["bare cpu"]; ok {
		f = append(f, figure{"bare redigo subscriber CPU", unit, bare}, figure{"proxy / bare subscriber", "×", proxy / bare})
	}
	return append(f, figure{"Redis CPU (whole server)", unit, d("redis cpu") * 1e6 / sent},
		figure{"load generator CPU", unit, d("own cpu") * 1e6 / sent},
		figure{"other processes on the machine", "cores", other / d("time")})
}

// snapshot is what a measurement takes the difference of: the proxy's
// /metrics (CPU and RSS from /proc when its PID is known), the CPU seconds of
// the bare subscriber, Redis, this process and the machine, and the counters.
func (lt *loadTest) snapshot() map[string]float64 {
	s := scrape()
	if lt.pid > 0 {
		s["process_cpu_seconds_total"], s["process_resident_memory_bytes"] = procStat(strconv.Itoa(lt.pid))
	}
	if lt.bare != nil {
		s["bare cpu"], _ = procStat(strconv.Itoa(lt.bare.Process.Pid))
	}
	s["own cpu"], _ = procStat("self")
	s["redis cpu"], s["machine cpu"], s["time"] = lt.redisCPU(), machineCPU(), float64(time.Now().UnixNano())/1e9
	s["bare"], s["delivered"] = float64(lt.bareReceived.Load()), float64(lt.delivered.Load())
	s["disorder"], s["dropped"] = float64(lt.disorder.Load()), float64(lt.dropped.Load())
	return s
}

// client is one WebSocket connection: the TCP connection x/net/websocket
// reads and writes through (Read and Write below), and what its read loop
// has seen.
type client struct {
	net.Conn
	r                 io.Reader // Conn, or a larger buffer over it
	dropOrigin        bool      // until the handshake request, one write, has gone
	status            string    // the first line received: the handshake's status
	ws                *websocket.Conn
	received, lastSeq atomic.Int64
	closing           atomic.Bool
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
	if i := bytes.Index(p, []byte("\r\nOrigin: ")); c.dropOrigin && i >= 0 {
		c.dropOrigin = false
		end := i + 2 + bytes.Index(p[i+2:], []byte("\r\n"))
		_, err := c.Conn.Write(append(p[:i:i], p[end:]...))
		return len(p), err
	}
	return c.Conn.Write(p)
}

// dialAll connects one client per session with -c concurrent dialers and
// returns the established clients and their handshake times, sorted.
func (lt *loadTest) dialAll(ctx context.Context) (clients []*client, handshakes []time.Duration) {
	var next atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	failures := map[string]int{}
	for range *dialers {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(lt.ids) && ctx.Err() == nil; i = int(next.Add(1)) - 1 {
				start := time.Now()
				c, err := lt.dial(ctx, lt.ids[i])
				mu.Lock()
				if err != nil {
					failures[err.Error()]++
				} else {
					clients, handshakes = append(clients, c), append(handshakes, time.Since(start))
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(failures) > 0 {
		fmt.Fprintf(os.Stderr, "%d connections failed: %v\n", len(lt.ids)-len(clients), failures)
	}
	lt.clients = append(lt.clients, clients...)
	slices.Sort(handshakes)
	return clients, handshakes
}

// dial connects a client to session id and completes the handshake within
// 15 s; a refusal is reported by its HTTP status line.
func (lt *loadTest) dial(ctx context.Context, id string) (*client, error) {
	config, err := websocket.NewConfig(*proxyURL+"/load/ws/"+id, cmp.Or(*origin, "http://dropped.invalid"))
	if err != nil {
		return nil, err
	}
	config.Header = http.Header{"Authorization": {"Bearer " + lt.token}}
	conn, err := (&net.Dialer{Timeout: 15 * time.Second}).DialContext(ctx, "tcp", config.Location.Host)
	if err != nil {
		return nil, err
	}
	c := &client{Conn: conn, r: conn, dropOrigin: *origin == ""}
	if lt.readBuffer > 0 {
		c.r = bufio.NewReaderSize(conn, lt.readBuffer)
	}
	conn.SetDeadline(time.Now().Add(15 * time.Second))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	c.ws, err = websocket.NewClient(config, c)
	stop()
	if errors.Is(err, websocket.ErrBadStatus) {
		err = errors.New(c.status)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

// startReaders runs a read loop per client until its connection ends;
// receiving also answers the proxy's pings (inside websocket.Message.Receive).
func (lt *loadTest) startReaders(clients []*client) {
	for _, c := range clients {
		go func() {
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
					lt.unrecognized.Do(func() { fmt.Fprintf(os.Stderr, "first unrecognized message: %.120q\n", msg) })
					continue
				}
				lt.mu.Lock()
				lt.latency = append(lt.latency, time.Duration(now-stamp))
				lt.mu.Unlock()
				if seq != c.lastSeq.Swap(seq)+1 {
					lt.disorder.Add(1)
				}
				c.received.Add(1)
				lt.delivered.Add(1)
				lt.lastRecv.Store(now)
			}
		}()
	}
}

// takeLatencies returns the latencies recorded so far and forgets them.
func (lt *loadTest) takeLatencies() []time.Duration {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	l := lt.latency
	lt.latency = nil
	return l
}

// closeAll closes every client.
func (lt *loadTest) closeAll() {
	for _, c := range lt.clients {
		c.closing.Store(true)
		c.ws.Close()
	}
	lt.clients = nil
}

func sessionID(runID string, i int) string { return fmt.Sprintf("%s-%d", runID, i) }
func authKey(id string) string             { return "session:" + id + ":auth" }
func downChannel(id string) string         { return "session:" + id + ":down" }

// pipeline sends cmd with args(id) for every session over the control
// connection, 1,000 at a time, and returns the sum of the integer replies.
func (lt *loadTest) pipeline(cmd string, args func(id string) []any) (sum int64, err error) {
	for batch := range slices.Chunk(lt.ids, 1000) {
		for _, id := range batch {
			lt.ctl.Send(cmd, args(id)...)
		}
		err = lt.ctl.Flush()
		for range batch {
			var reply any
			if err == nil {
				reply, err = lt.ctl.Receive()
			}
			n, _ := reply.(int64)
			sum += n
		}
		if err != nil {
			return sum, fmt.Errorf("%s: %w", cmd, err)
		}
	}
	return sum, nil
}

// cleanup closes everything this run opened and deletes its session keys.
func (lt *loadTest) cleanup() {
	lt.closeAll()
	if lt.bare != nil {
		lt.bare.Process.Kill()
		lt.bare.Wait()
	}
	for _, p := range lt.pubs {
		p.conn.Close()
	}
	lt.stopProxy()
	n, err := lt.pipeline("DEL", func(id string) []any { return []any{authKey(id)} })
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanup: %v (keys session:%s-*:auth remain)\n", err, lt.runID)
	}
	fmt.Fprintf(os.Stderr, "cleanup: deleted %d session keys of run %s\n", n, lt.runID)
	lt.ctl.Close()
}

// pace is a publishing run: rate msg/s in total (0 = as fast as allowed) for
// duration; window, when set, holds publishing back while it returns false.
type pace struct {
	rate     float64
	duration time.Duration
	window   func() bool
}

// publisher is one pipelined Redis connection and the sessions it owns. It
// writes its PUBLISH commands itself, a batch per write, and discards the
// replies.
type publisher struct {
	conn         net.Conn // dialled and authenticated by redigo
	channels     []string
	seq          []int64 // the last sequence number sent, per channel
	next         int
	buf, payload []byte
	share        float64 // of all sessions
}

// openPublishers dials the publishers; publisher i owns sessions i, i+4, ….
func (lt *loadTest) openPublishers() error {
	for i := range min(publishers, len(lt.ids)) {
		p := &publisher{}
		_, err := redis.DialURL(*redisURL, redis.DialNetDial(func(network, addr string) (c net.Conn, err error) {
			p.conn, err = net.Dial(network, addr)
			return p.conn, err
		}))
		if err != nil {
			return fmt.Errorf("publisher: %w", err)
		}
		lt.pubs = append(lt.pubs, p)
		go io.Copy(io.Discard, p.conn) // the replies
		for j := i; j < len(lt.ids); j += publishers {
			p.channels = append(p.channels, downChannel(lt.ids[j]))
		}
		p.seq, p.share = make([]int64, len(p.channels)), float64(len(p.channels))/float64(len(lt.ids))
	}
	return nil
}

// publishAll runs pc on every publisher and returns the number sent.
func (lt *loadTest) publishAll(ctx context.Context, pc pace) int64 {
	var wg sync.WaitGroup
	var total atomic.Int64
	for _, p := range lt.pubs {
		wg.Go(func() { total.Add(p.run(ctx, pc, &lt.published)) })
	}
	wg.Wait()
	return total.Load()
}

// run publishes this connection's share of pc round robin over its channels,
// on a 1 ms ticker when a rate is set (catching up when a tick comes late,
// so that the rate holds on a busy machine), and counts them in published.
func (p *publisher) run(ctx context.Context, pc pace, published *atomic.Int64) (sent int64) {
	rate := pc.rate * p.share
	ticker := time.NewTicker(time.Millisecond) // costs nothing while nobody waits on it
	defer ticker.Stop()
	for start := time.Now(); ctx.Err() == nil && time.Since(start) < pc.duration; {
		batch := int64(256)
		if rate > 0 {
			batch = int64(rate*time.Since(start).Seconds()) - sent
		}
		if pc.window != nil && !pc.window() {
			batch = 0
		}
		if batch = min(batch, maxBatch); batch > 0 {
			p.buf = p.buf[:0]
			for range batch {
				p.next = (p.next + 1) % len(p.channels)
				p.seq[p.next]++
				p.payload = appendPayload(p.payload[:0], time.Now().UnixNano(), p.seq[p.next])
				p.buf = appendPublish(p.buf, p.channels[p.next], p.payload)
			}
			if _, err := p.conn.Write(p.buf); err != nil {
				fmt.Fprintln(os.Stderr, "publisher:", err)
				return sent
			}
			sent += batch
			published.Add(batch)
		}
		if rate > 0 {
			select {
			case <-ticker.C:
			case <-ctx.Done():
			}
		} else if batch <= 0 {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return sent
}

// appendPublish appends PUBLISH channel payload in RESP, as redigo writes it.
func appendPublish(b []byte, channel string, payload []byte) []byte {
	b = strconv.AppendInt(append(b, "*3\r\n$7\r\nPUBLISH\r\n$"...), int64(len(channel)), 10)
	b = append(append(append(b, "\r\n"...), channel...), "\r\n$"...)
	b = strconv.AppendInt(b, int64(len(payload)), 10)
	return append(append(append(b, "\r\n"...), payload...), "\r\n"...)
}

// appendPayload builds `"<unix nanos> <seq> xxx…"`, -size bytes of valid JSON.
func appendPayload(b []byte, stamp, seq int64) []byte {
	b = strconv.AppendInt(append(b, '"'), stamp, 10)
	b = append(strconv.AppendInt(append(b, ' '), seq, 10), ' ')
	for len(b) < *size-1 {
		b = append(b, 'x')
	}
	return append(b, '"')
}

// parsePayload reads the stamp and sequence number back, without allocating.
func parsePayload(m []byte) (stamp, seq int64, ok bool) {
	rest, quoted := bytes.CutPrefix(m, []byte{'"'})
	first, rest, _ := bytes.Cut(rest, []byte{' '})
	second, _, spaced := bytes.Cut(rest, []byte{' '})
	stamp, ok1 := atoi(first)
	seq, ok2 := atoi(second)
	return stamp, seq, quoted && spaced && ok1 && ok2
}

func atoi(digits []byte) (n int64, ok bool) {
	for _, d := range digits {
		if d < '0' || d > '9' {
			return 0, false
		}
		n = n*10 + int64(d-'0')
	}
	return n, len(digits) > 0
}

// startBareSub runs the floor, this program with -mode baresub on the same
// down channels, and waits (30 s at most) until it has confirmed every
// subscription, which its first line of output says.
func (lt *loadTest) startBareSub(ctx context.Context) error {
	lt.bare = exec.CommandContext(ctx, os.Args[0], "-mode", "baresub", "-redis", *redisURL, "-run", lt.runID,
		"-sessions", strconv.Itoa(len(lt.ids)))
	lt.bare.Stderr = os.Stderr
	stdout, err := lt.bare.StdoutPipe()
	if err == nil {
		err = lt.bare.Start()
	}
	if err != nil {
		lt.bare = nil
		return fmt.Errorf("bare subscriber: %w", err)
	}
	lines := bufio.NewScanner(stdout)
	kill := time.AfterFunc(30*time.Second, func() { lt.bare.Process.Kill() })
	subscribed := lines.Scan()
	kill.Stop()
	if !subscribed {
		return cmp.Or(ctx.Err(), errors.New("bare subscriber: not subscribed (it is killed after 30 s)"))
	}
	go func() {
		for ok := true; ok; ok = lines.Scan() {
			n, _ := strconv.ParseInt(lines.Text(), 10, 64)
			lt.bareReceived.Store(n)
		}
	}()
	return nil
}

// runBareSub is the child: it subscribes, then prints the number of
// messages received every 50 ms until it is killed.
func runBareSub() int {
	conn, err := redis.DialURL(*redisURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "baresub:", err)
		return 1
	}
	psc := redis.PubSubConn{Conn: conn}
	channels := make([]any, *sessions)
	for i := range channels {
		channels[i] = downChannel(sessionID(*runID, i))
	}
	psc.Subscribe(channels...) // an error surfaces in Receive
	var received atomic.Int64
	for confirmed := 0; ; {
		switch v := psc.Receive().(type) {
		case redis.Subscription:
			if confirmed++; confirmed == len(channels) {
				go func() {
					for range time.Tick(50 * time.Millisecond) {
						fmt.Println(received.Load())
					}
				}()
			}
		case redis.Message:
			received.Add(1)
		case error:
			fmt.Fprintln(os.Stderr, "baresub:", v)
			return 1
		}
	}
}

// startProxy (re)starts the -spawn proxy and waits until it is ready.
func (lt *loadTest) startProxy(ctx context.Context) error {
	if *spawn == "" {
		return nil
	}
	lt.stopProxy()
	ready := strings.TrimSuffix(metricsURL, "metrics") + "ready"
	if answers(ready) { // do not measure whoever has the port
		return fmt.Errorf("-spawn: something already answers %s", ready)
	}
	u, _ := url.Parse(*proxyURL)
	cmd := exec.Command(*spawn)
	cmd.Env = append(append([]string{"LOG_LEVEL=warn"}, os.Environ()...), "HOST=127.0.0.1", "PORT="+u.Port(), "REDIS_URL="+*redisURL)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("-spawn: %w", err)
	}
	lt.pid, lt.stopProxy = cmd.Process.Pid, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		kill := time.AfterFunc(10*time.Second, func() { cmd.Process.Kill() })
		cmd.Wait()
		kill.Stop()
	}
	waitUntil(ctx, 10*time.Second, func() bool { return answers(ready) })
	if !answers(ready) {
		return cmp.Or(ctx.Err(), fmt.Errorf("-spawn: %s not ready after 10 s", *spawn))
	}
	return nil
}

// answers says whether url answers 200 OK.
func answers(url string) bool {
	resp, err := metricsClient.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

var metricsClient = &http.Client{Timeout: 5 * time.Second}

// scrape reads the proxy's /metrics into series (name with labels) -> value;
// empty if the proxy does not answer.
func scrape() map[string]float64 {
	m := map[string]float64{}
	resp, err := metricsClient.Get(metricsURL)
	if err != nil {
		return m
	}
	defer resp.Body.Close()
	for lines := bufio.NewScanner(resp.Body); lines.Scan(); {
		series, value, _ := strings.Cut(lines.Text(), " ") // no spaces in labels, no timestamps
		if v, err := strconv.ParseFloat(value, 64); err == nil && !strings.HasPrefix(series, "#") {
			m[series] = v
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
	if count <= 0 {
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
func procStat(pid string) (cpu, rss float64) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:])) // the name may hold spaces
	if err != nil || len(f) < 22 {
		return math.NaN(), math.NaN()
	}
	user, _ := strconv.ParseFloat(f[11], 64)
	sys, _ := strconv.ParseFloat(f[12], 64)
	pages, _ := strconv.ParseFloat(f[21], 64)
	return (user + sys) / 100, pages * float64(os.Getpagesize())
}

// machineCPU is the CPU seconds all processes have used (/proc/stat, all
// but idle and iowait).
func machineCPU() (busy float64) {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	for i, field := range strings.Fields(line)[1:] {
		if v, err := strconv.ParseFloat(field, 64); err == nil && i != 3 && i != 4 {
			busy += v
		}
	}
	return busy / 100
}

// redisCPU is the Redis server's used_cpu_sys + used_cpu_user (INFO cpu).
func (lt *loadTest) redisCPU() (total float64) {
	info, _ := redis.String(lt.ctl.Do("INFO", "cpu"))
	for _, line := range strings.Fields(info) {
		k, v, _ := strings.Cut(line, ":")
		if f, err := strconv.ParseFloat(v, 64); err == nil && (k == "used_cpu_sys" || k == "used_cpu_user") {
			total += f
		}
	}
	return total
}

// figure is one row of one run's results.
type figure struct {
	name, unit string
	value      float64
}

// report prints the runs (each the same figures) as a table, a row per
// figure and a column per run and the median, and returns the medians.
func report(title string, runs [][]figure) map[string]figure {
	medians := map[string]figure{}
	if len(runs) == 0 {
		return medians
	}
	columns := len(runs)
	if columns == 1 {
		columns = 0 // the median says it all
	}
	fmt.Printf("\n%s\n", title)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "figure\tunit\t")
	for i := range columns {
		fmt.Fprintf(tw, "run %d\t", i+1)
	}
	fmt.Fprintln(tw, "median\t")
	for i, f := range runs[0] {
		fmt.Fprintf(tw, "%s\t%s\t", f.name, f.unit)
		var values []float64
		for j, run := range runs {
			if values = append(values, run[i].value); j < columns {
				fmt.Fprintf(tw, "%s\t", formatValue(run[i].value))
			}
		}
		medians[f.name] = figure{f.name, f.unit, median(values)}
		fmt.Fprintf(tw, "%s\t\n", formatValue(medians[f.name].value))
	}
	tw.Flush()
	return medians
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
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "n/a"
	case a >= 100 || v == math.Trunc(v):
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// waitUntil polls cond every 10 ms until it holds, limit passes or ctx ends.
func waitUntil(ctx context.Context, limit time.Duration, cond func() bool) {
	for deadline := time.Now().Add(limit); !cond() && ctx.Err() == nil && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
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

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadtest: "+format+"\n", args...)
	os.Exit(2)
}
