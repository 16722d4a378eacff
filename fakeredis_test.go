package main

import (
	"bufio"
	"fmt"
	"io"
	"maps"
	"net"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomodule/redigo/redis"
)

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
