// Command ws_bidir_client is a WebSocket client of wsproxy that shows both
// directions: it prints every message the proxy delivers (data published to
// session:{session_id}:down, and the proxy's control errors), sends a small
// JSON ping message every few seconds (it arrives on session:{session_id}:up),
// sends each line typed on standard input as one message, and reports the
// close code and reason when the connection ends.
//
//	go run ./examples/ws_bidir_client [-ping-interval 3s] [-origin URL] <agent_id> <session_id> <token>
//
// The proxy's address comes from WSPROXY_URL (default ws://127.0.0.1:8080).
// The token travels in the Authorization header, as a non-browser client
// should send it; browsers use ?token= instead (see examples/browser).
//
// x/net/websocket's Message.Receive returns single frames and hides close
// frames, so this client reads frames itself (readMessage): it reassembles
// fragmented messages and sees the close code and reason.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
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
	// writeTimeout bounds each frame this client writes.
	writeTimeout = 10 * time.Second
	// closeTimeout is how long Ctrl+C waits for the proxy to answer our close frame.
	closeTimeout = 3 * time.Second
	// maxMessageSize bounds a reassembled message (the proxy's own outbound
	// buffer defaults to 10 MiB, so nothing legitimate is larger).
	maxMessageSize = 32 << 20

	// Close codes, RFC 6455 section 7.4.1.
	closeNormal        = 1000
	closeProtocolError = 1002
	closeNoStatus      = 1005
	closeTooBig        = 1009
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

func main() {
	flags := flag.NewFlagSet("ws_bidir_client", flag.ContinueOnError)
	flags.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	pingInterval := flags.Duration("ping-interval", 3*time.Second, "time between ping messages; 0 sends none")
	origin := flags.String("origin", "http://localhost", "Origin header; must be listed in the proxy's ALLOWED_ORIGINS when that is set")
	if err := flags.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if flags.NArg() != 3 || !validID.MatchString(flags.Arg(0)) || !validID.MatchString(flags.Arg(1)) ||
		flags.Arg(2) == "" || *pingInterval < 0 {
		fail(2, usage)
	}
	agentID, sessionID, token := flags.Arg(0), flags.Arg(1), flags.Arg(2)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	location := strings.TrimRight(getenv("WSPROXY_URL", "ws://127.0.0.1:8080"), "/") + "/" + agentID + "/ws/" + sessionID
	config, err := websocket.NewConfig(location, *origin)
	if err != nil {
		fail(2, "bad WSPROXY_URL or -origin: "+err.Error())
	}
	config.Header.Set("Authorization", "Bearer "+token)

	out.Printf("connecting to %s", location)
	ws, conn, err := dial(ctx, config)
	if err != nil {
		fail(1, "connect failed: "+explainHandshakeFailure(ctx, config, err))
	}
	out.Printf("connected")

	// readMessages owns every read of the socket; it ends when a close frame
	// arrives or the connection fails, and reports which on closed.
	closed := make(chan closeStatus, 1)
	go func() { closed <- readMessages(ws) }()

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
			send(conn, ws, string(message))
		case line := <-lines:
			send(conn, ws, line)
		case status := <-closed:
			if !status.received {
				conn.Close()
				fail(1, "connection lost: "+status.err.Error())
			}
			out.Printf("closed: code=%d reason=%q", status.code, status.reason)
			// RFC 6455 section 5.5.1: answer a close frame with one, echoing its code.
			reply := status.code
			if reply == closeNoStatus {
				reply = closeNormal
			}
			conn.SetWriteDeadline(time.Now().Add(writeTimeout))
			ws.WriteClose(reply)
			conn.Close()
			return
		case <-ctx.Done():
			// Ctrl+C: start the closing handshake and wait briefly for the answer.
			conn.SetWriteDeadline(time.Now().Add(writeTimeout))
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

// dial connects to the proxy and performs the opening handshake. It keeps the
// underlying connection so that closing it never sends a second close frame
// (websocket.Conn.Close always writes one).
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
	ws, err := websocket.NewClient(config, conn)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	conn.SetDeadline(time.Time{})
	return ws, conn, nil
}

// explainHandshakeFailure turns x/net/websocket's "bad status" into the
// proxy's own answer by repeating the handshake as a plain HTTP request, so a
// user sees for example "401 unknown_session: ..." rather than "bad status".
func explainHandshakeFailure(ctx context.Context, config *websocket.Config, dialErr error) string {
	if !errors.Is(dialErr, websocket.ErrBadStatus) {
		return dialErr.Error()
	}
	target := *config.Location
	target.Scheme = map[string]string{"ws": "http", "wss": "https"}[target.Scheme]
	request, err := http.NewRequestWithContext(ctx, http.MethodGet, target.String(), nil)
	if err != nil {
		return dialErr.Error()
	}
	key := make([]byte, 16)
	rand.Read(key)
	request.Header = config.Header.Clone()
	request.Header.Set("Origin", config.Origin.String())
	request.Header.Set("Upgrade", "websocket")
	request.Header.Set("Connection", "Upgrade")
	request.Header.Set("Sec-WebSocket-Version", "13")
	request.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(key))
	client := &http.Client{Timeout: handshakeTimeout}
	response, err := client.Do(request)
	if err != nil {
		return dialErr.Error()
	}
	defer response.Body.Close()
	if response.StatusCode == http.StatusSwitchingProtocols {
		return dialErr.Error() + " (a second attempt succeeded: try again)"
	}
	body, _ := io.ReadAll(io.LimitReader(response.Body, 4096))
	var answer struct{ Error, Message string }
	if json.Unmarshal(body, &answer) == nil && answer.Error != "" {
		return fmt.Sprintf("%d %s: %s", response.StatusCode, answer.Error, answer.Message)
	}
	return fmt.Sprintf("%s: %s", response.Status, strings.TrimSpace(string(body)))
}

// send prints one text message and writes it. Printing first keeps "sent:"
// ahead of the proxy's answer to it, which the reading goroutine prints.
func send(conn net.Conn, ws *websocket.Conn, message string) {
	out.Printf("sent: %s", message)
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := websocket.Message.Send(ws, message); err != nil {
		out.Printf("send failed: %v", err)
	}
}

// readMessages prints every message until the connection ends.
func readMessages(ws *websocket.Conn) closeStatus {
	for {
		opcode, message, err := readMessage(ws)
		if err != nil {
			return closeStatus{err: err}
		}
		switch opcode {
		case websocket.CloseFrame:
			return parseClose(message)
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

func fail(status int, message string) {
	fmt.Fprintln(os.Stderr, message)
	os.Exit(status)
}
