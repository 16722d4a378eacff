// Command ws_bidir_client is a WebSocket client of wsproxy that shows both
// directions: it prints every message the proxy delivers (data published to
// session:{session_id}:down, and the proxy's control errors), sends a small
// JSON ping message every few seconds (it arrives on session:{session_id}:up),
// sends each line typed on standard input as one message, and reports the
// close code and reason when the connection ends.
//
//	go run ./examples/ws_bidir_client [-ping-interval 3s] [-origin URL] <agent_id> <session_id> <token>
//
//	-ping-interval  time between ping messages (default 3s; 0 sends none)
//	-origin         the Origin header (default http://localhost); it must be
//	                listed in the proxy's ALLOWED_ORIGINS when that is set
//
// The proxy's address comes from WSPROXY_URL (default ws://127.0.0.1:8080).
// The token travels in the Authorization header, as a non-browser client
// should send it; browsers use ?token= instead (see examples/browser).
//
// The handshake is made exactly once. A refused one prints a single line and
// exits with status 3 or 4. The proxy refuses in one of two ways: a request
// with an Origin header (this client always sends one) gets a 101 followed
// at once by a close frame with code 4000 + the HTTP status and the error
// code as reason, printed as "refused: 4401 unknown_session"; a request
// without one gets the HTTP status and a JSON body, printed as
// "refused: 401 unknown_session: <message>".
//
// Exit status:
//
//	0  the connection ended with a close frame (Ctrl+C, or the proxy closed it)
//	1  the connection could not be made, or was lost
//	2  bad arguments (a one-line usage is printed)
//	3  refused for good: HTTP 4xx or close 4400-4499 (bad request, missing,
//	   wrong or expired token, unknown session, origin not allowed); trying
//	   again will not help without a new token or a fixed request
//	4  refused for now: HTTP 5xx or close 4500-4599 (draining, too many
//	   connections, Redis unavailable or slow); try again later, with backoff
//
// x/net/websocket's Message.Receive returns single frames and hides close
// frames, so this client reads frames itself (readMessage): it reassembles
// fragmented messages and sees the close code and reason.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"time"

	"golang.org/x/net/websocket"
)

const usage = "usage: ws_bidir_client [-ping-interval 3s] [-origin URL] <agent_id> <session_id> <token>   (WSPROXY_URL defaults to ws://127.0.0.1:8080)"

const (
	// handshakeTimeout bounds connecting and the opening handshake.
	handshakeTimeout = 10 * time.Second
	// refusalWait is how long "connected" waits for a close frame that
	// refuses the handshake just completed: the proxy sends it right after
	// the 101, so it arrives with it or not at all.
	refusalWait = 250 * time.Millisecond
	// writeTimeout bounds each frame this client writes.
	writeTimeout = 10 * time.Second
	// closeTimeout is how long Ctrl+C waits for the proxy to answer our close frame.
	closeTimeout = 3 * time.Second
	// maxMessageSize bounds a reassembled message (the proxy's own outbound
	// buffer defaults to 10 MiB, so nothing legitimate is larger).
	maxMessageSize = 32 << 20
	// maxRecorded bounds what is kept of the handshake's answer.
	maxRecorded = 64 << 10

	// Close codes, RFC 6455 section 7.4.1.
	closeNormal        = 1000
	closeProtocolError = 1002
	closeNoStatus      = 1005
	closeTooBig        = 1009

	// Exit statuses (see the package comment).
	exitFailed     = 1
	exitUsage      = 2
	exitRefused    = 3
	exitRetryLater = 4
)

// validID is the proxy's rule for agent and session ids.
var validID = regexp.MustCompile(`^[A-Za-z0-9._~-]{1,128}$`)

// out serialises printing from the reading and the sending goroutine.
var out = log.New(os.Stdout, "", 0)

// pingMessage is what the client sends every -ping-interval.
type pingMessage struct {
	Type string `json:"type"`
	Seq  int    `json:"seq"`
	Time string `json:"time"`
}

// controlMessage is the part of a proxy control message this client reads.
type controlMessage struct {
	Type    string `json:"type"`
	Command string `json:"command"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// closeStatus is how the connection ended, as seen by the reading goroutine.
type closeStatus struct {
	received bool   // a close frame arrived; otherwise err says why reading stopped
	code     int    // closeNoStatus when the close frame carried no code
	reason   string // may be empty
	err      error
}

// refusal is the proxy refusing the handshake, either way it does so.
type refusal struct {
	code    int    // the HTTP status, or the close code (4000 + the HTTP status)
	reason  string // the proxy's error code, such as unknown_session
	message string // the HTTP answer's message; a close frame carries none
}

func (r *refusal) Error() string {
	text := fmt.Sprintf("refused: %d %s", r.code, r.reason)
	if r.message != "" {
		text += ": " + r.message
	}
	return text
}

// exitStatus is 4 when trying again later may succeed (5xx, 45xx), else 3.
func (r *refusal) exitStatus() int {
	if r.code%1000 >= 500 {
		return exitRetryLater
	}
	return exitRefused
}

// isRefusal tells a close code the proxy refuses a handshake with: 4000 +
// an HTTP status 400-599. The proxy closes an open connection only with
// 1000-1011, or with the client's own code echoed.
func isRefusal(code int) bool { return code >= 4400 && code <= 4599 }

func main() {
	flags := flag.NewFlagSet("ws_bidir_client", flag.ContinueOnError)
	flags.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	pingInterval := flags.Duration("ping-interval", 3*time.Second, "time between ping messages; 0 sends none")
	origin := flags.String("origin", "http://localhost", "Origin header; must be listed in the proxy's ALLOWED_ORIGINS when that is set")
	if err := flags.Parse(os.Args[1:]); err != nil {
		os.Exit(exitUsage)
	}
	if flags.NArg() != 3 || !validID.MatchString(flags.Arg(0)) || !validID.MatchString(flags.Arg(1)) ||
		flags.Arg(2) == "" || *pingInterval < 0 {
		fail(exitUsage, usage)
	}
	agentID, sessionID, token := flags.Arg(0), flags.Arg(1), flags.Arg(2)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	location := strings.TrimRight(getenv("WSPROXY_URL", "ws://127.0.0.1:8080"), "/") + "/" + agentID + "/ws/" + sessionID
	config, err := websocket.NewConfig(location, *origin)
	if err != nil {
		fail(exitUsage, "bad WSPROXY_URL or -origin: "+err.Error())
	}
	config.Header.Set("Authorization", "Bearer "+token)

	out.Printf("connecting to %s", location)
	ws, conn, err := dial(ctx, config)
	var refused *refusal
	if errors.As(err, &refused) {
		exitRefusedWith(refused)
	} else if err != nil {
		fail(exitFailed, "connect failed: "+err.Error())
	}

	// readMessages owns every read of the socket; it ends when a close frame
	// arrives or the connection fails, and reports which on closed. It
	// prints nothing before shown is closed.
	closed := make(chan closeStatus, 1)
	first := make(chan struct{}, 1)
	shown := make(chan struct{})
	go func() { closed <- readMessages(ws, first, shown) }()

	// A refused handshake is a 101 and at once a close frame: give it a
	// moment to arrive before saying "connected".
	select {
	case <-first:
	case status := <-closed:
		if status.received && isRefusal(status.code) {
			answerClose(ws, status.code)
			conn.Close()
			refused := &refusal{code: status.code, reason: status.reason}
			exitRefusedWith(refused)
		}
		closed <- status // an ordinary end, reported below
	case <-time.After(refusalWait):
	}
	out.Printf("connected")
	close(shown)

	// readLines never ends while standard input stays open; the process
	// exit ends it.
	lines := make(chan string)
	go readLines(os.Stdin, lines)

	var pings <-chan time.Time
	if *pingInterval > 0 {
		ticker := time.NewTicker(*pingInterval)
		defer ticker.Stop()
		pings = ticker.C
	}

	seq := 0
	for {
		select {
		case <-pings:
			seq++
			message, _ := json.Marshal(pingMessage{Type: "ping", Seq: seq, Time: time.Now().UTC().Format(time.RFC3339)})
			send(ws, string(message))
		case line := <-lines:
			send(ws, line)
		case status := <-closed:
			if !status.received {
				conn.Close()
				fail(exitFailed, "connection lost: "+status.err.Error())
			}
			answerClose(ws, status.code)
			conn.Close()
			if isRefusal(status.code) { // arrived later than refusalWait
				refused := &refusal{code: status.code, reason: status.reason}
				exitRefusedWith(refused)
			}
			out.Printf("closed: code=%d reason=%q", status.code, status.reason)
			return
		case <-ctx.Done():
			// Ctrl+C: start the closing handshake and wait briefly for the answer.
			ws.WriteClose(closeNormal)
			select {
			case status := <-closed:
				if status.received {
					out.Printf("closed: code=%d reason=%q", status.code, status.reason)
				} else {
					out.Printf("closed without an answer from the proxy: %v", status.err)
				}
			case <-time.After(closeTimeout):
				out.Printf("closed without an answer from the proxy")
			}
			conn.Close()
			return
		}
	}
}

// answerClose answers a close frame with one echoing its code (RFC 6455
// section 5.5.1).
func answerClose(ws *websocket.Conn, code int) {
	if code == closeNoStatus {
		code = closeNormal
	}
	ws.WriteClose(code)
}

// dial connects to the proxy and performs the opening handshake, once. It
// keeps the underlying connection so that closing it never sends a second
// close frame (websocket.Conn.Close always writes one). A refusal by HTTP
// status is returned as a *refusal, read from the answer to this very
// handshake: x/net/websocket only says "bad status", so the bytes it read
// are recorded and parsed again.
func dial(ctx context.Context, config *websocket.Config) (*websocket.Conn, net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	address := config.Location.Host
	if config.Location.Port() == "" {
		address = net.JoinHostPort(config.Location.Hostname(), map[string]string{"ws": "80", "wss": "443"}[config.Location.Scheme])
	}
	var conn net.Conn
	var err error
	switch config.Location.Scheme {
	case "ws":
		conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", address)
	case "wss":
		conn, err = (&tls.Dialer{Config: config.TlsConfig}).DialContext(ctx, "tcp", address)
	default:
		return nil, nil, errors.New("WSPROXY_URL must start with ws:// or wss://")
	}
	if err != nil {
		return nil, nil, err
	}
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	// Ctrl+C during the handshake ends it at once.
	interrupted := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	recorder := &recordingConn{Conn: conn, recording: true}
	ws, err := websocket.NewClient(config, recorder)
	if err != nil {
		if errors.Is(err, websocket.ErrBadStatus) {
			err = readRefusal(recorder.data.Bytes(), conn)
		}
		interrupted()
		conn.Close()
		return nil, nil, err
	}
	recorder.recording = false // before the reading goroutine starts
	if !interrupted() {
		conn.Close()
		return nil, nil, ctx.Err()
	}
	conn.SetDeadline(time.Time{})
	return ws, conn, nil
}

// recordingConn keeps a copy of what is read while recording (the
// handshake), and afterwards bounds every write by writeTimeout from its
// start: the pongs x/net/websocket writes for the reading goroutine too, so
// that none inherits the deadline of an earlier write long past.
type recordingConn struct {
	net.Conn
	recording bool
	data      bytes.Buffer
}

func (c *recordingConn) Write(p []byte) (int, error) {
	if !c.recording { // the handshake has its own deadline
		c.Conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	}
	return c.Conn.Write(p)
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.recording && c.data.Len()+n <= maxRecorded {
		c.data.Write(p[:n])
	}
	return n, err
}

// readRefusal parses the answer to a handshake that was not 101: the bytes
// x/net/websocket read, then, should the body be longer, the connection.
// The proxy answers a refusal with its JSON error body,
// {"error":"<code>","message":"..."}.
func readRefusal(answer []byte, conn net.Conn) error {
	reader := bufio.NewReader(io.MultiReader(bytes.NewReader(answer), conn))
	response, err := http.ReadResponse(reader, &http.Request{Method: http.MethodGet})
	if err != nil {
		return fmt.Errorf("%w (the answer cannot be read: %v)", websocket.ErrBadStatus, err)
	}
	defer response.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(response.Body, 4096))
	text, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n")
	if response.StatusCode < 400 || response.StatusCode > 599 {
		return fmt.Errorf("%s, want 101 Switching Protocols: %s", response.Status, text)
	}
	var proxyError struct{ Error, Message string }
	if json.Unmarshal(body, &proxyError) == nil && proxyError.Error != "" {
		return &refusal{code: response.StatusCode, reason: proxyError.Error, message: proxyError.Message}
	}
	// Not the proxy's answer: something in front of it, perhaps.
	return &refusal{code: response.StatusCode, reason: http.StatusText(response.StatusCode), message: text}
}

// send prints one text message and writes it. Printing first keeps "sent:"
// ahead of the proxy's answer to it, which the reading goroutine prints.
func send(ws *websocket.Conn, message string) {
	out.Printf("sent: %s", message)
	if err := websocket.Message.Send(ws, message); err != nil {
		out.Printf("send failed: %v", err)
	}
}

// readMessages prints every message until the connection ends. On the first
// message it signals first and waits for shown, so that "connected" is
// printed before it.
func readMessages(ws *websocket.Conn, first chan<- struct{}, shown <-chan struct{}) closeStatus {
	for started := false; ; started = true {
		opcode, message, err := readMessage(ws)
		if err != nil {
			return closeStatus{err: err}
		}
		if opcode == websocket.CloseFrame {
			return parseClose(message)
		}
		if !started {
			first <- struct{}{}
			<-shown
		}
		switch opcode {
		case websocket.BinaryFrame:
			out.Printf("received binary message: %d bytes", len(message))
		case websocket.TextFrame:
			var control controlMessage
			if json.Unmarshal(message, &control) == nil && control.Type == "control" && control.Command == "error" {
				out.Printf("control error: code=%s message=%q", control.Code, control.Message)
			} else {
				out.Printf("received: %s", message)
			}
		}
	}
}

// readMessage returns the next message, reassembled from its frames. Ping
// frames are answered on the way. A close frame is returned as a message of
// type websocket.CloseFrame holding the close frame's payload.
func readMessage(ws *websocket.Conn) (opcode byte, message []byte, err error) {
	inMessage := false
	for {
		frame, err := ws.NewFrameReader()
		if err != nil {
			return 0, nil, err
		}
		// The first header byte holds FIN (RFC 6455 section 5.2). Reading the
		// header here also consumes it, which HandleFrame would otherwise do.
		var header []byte
		if headerReader := frame.HeaderReader(); headerReader != nil {
			header, _ = io.ReadAll(headerReader)
		}
		if len(header) == 0 {
			return 0, nil, websocket.ErrBadFrame
		}
		final := header[0]&0x80 != 0
		frameType := frame.PayloadType()

		if frameType == websocket.CloseFrame {
			payload, err := io.ReadAll(io.LimitReader(frame, 125))
			return websocket.CloseFrame, payload, err
		}
		dataFrame := frameType == websocket.TextFrame || frameType == websocket.BinaryFrame || frameType == websocket.ContinuationFrame
		if dataFrame && (frameType == websocket.ContinuationFrame) != inMessage {
			ws.WriteClose(closeProtocolError)
			return 0, nil, errors.New("protocol error: unexpected frame sequence")
		}
		// HandleFrame answers pings, swallows pongs (returning nil) and gives
		// a continuation frame the type of the message's first frame.
		frame, err = ws.HandleFrame(frame)
		if err != nil {
			return 0, nil, err
		}
		if frame == nil {
			continue
		}
		if t := frame.PayloadType(); t != websocket.TextFrame && t != websocket.BinaryFrame {
			ws.WriteClose(closeProtocolError)
			return 0, nil, fmt.Errorf("protocol error: frame type %d", t)
		}
		inMessage = true
		data, err := io.ReadAll(io.LimitReader(frame, int64(maxMessageSize-len(message)+1)))
		if err != nil {
			return 0, nil, err
		}
		message = append(message, data...)
		if len(message) > maxMessageSize {
			ws.WriteClose(closeTooBig)
			return 0, nil, errors.New("message larger than 32 MiB")
		}
		if final {
			return frame.PayloadType(), message, nil
		}
	}
}

// parseClose reads a close frame's payload: a 2-byte code and a UTF-8 reason
// (RFC 6455 section 5.5.1), or nothing at all.
func parseClose(payload []byte) closeStatus {
	switch len(payload) {
	case 0:
		return closeStatus{received: true, code: closeNoStatus}
	case 1:
		return closeStatus{received: true, code: closeProtocolError, reason: "malformed close frame"}
	}
	return closeStatus{received: true, code: int(binary.BigEndian.Uint16(payload)), reason: string(payload[2:])}
}

// readLines sends each non-empty line of r on lines.
func readLines(r io.Reader, lines chan<- string) {
	scanner := bufio.NewScanner(r)
	scanner.Buffer(make([]byte, 64*1024), maxMessageSize)
	for scanner.Scan() {
		if line := strings.TrimSpace(scanner.Text()); line != "" {
			lines <- line
		}
	}
}

func getenv(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// exitRefusedWith reports a refusal on standard output, where "connecting
// to" went before it (so that the two keep their order in a pipe, too), and
// exits with its status.
func exitRefusedWith(r *refusal) {
	out.Print(r.Error())
	os.Exit(r.exitStatus())
}

func fail(status int, message string) {
	fmt.Fprintln(os.Stderr, message)
	os.Exit(status)
}
