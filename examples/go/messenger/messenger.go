// Package messenger is a Go client for the Clutch master: Egg.js's messenger
// over gRPC.
//
// A child process that the master launched (the agent or an app worker)
// calls [Connect], which reads the CLUTCH_* environment, opens the
// Messenger.Attach stream and registers:
//
//	m, err := messenger.Connect(ctx)
//	if err != nil { log.Fatal(err) }
//	m.On("ping", func(msg *messenger.Message) { log.Printf("ping %s", msg.Data) })
//	if err := m.Ready(ctx); err != nil { log.Fatal(err) }
//	if err := m.EggReady(ctx); err != nil { log.Fatal(err) }   // every process is up
//	_, err = m.SendToAgent(ctx, "pong", map[string]any{"worker": m.Identity().WorkerID})
//	<-m.Done()                                                  // exits when the master goes
//
// Behaviour (the same in every Clutch SDK):
//
//   - Handlers run one at a time, in arrival order, on the dispatcher
//     goroutine. Keep them short; start a goroutine for slow work (a handler
//     that waits for a send's result must do so on its own goroutine).
//   - egg-ready, egg-pids (data: a JSON list of pids) and agent-start also
//     reach On handlers under those action names, as in Egg.
//   - Messages that arrive before Ready with no handler yet are kept until a
//     handler for their action is registered.
//   - Broadcast, SendToApp, SendToAgent, SendRandom and SendTo wait for the
//     master's account and return an *UndeliveredError when a target was
//     missed; status.Code(err) gives its gRPC code (codes.NotFound for a pid
//     nobody has). Emit is the fire-and-forget variant; its failures go to
//     OnUndelivered.
//   - Data is JSON: any value encoding/json accepts ([Raw] is sent as it
//     is). Message.Decode keeps numbers exact (json.Number) when decoding
//     into an interface value.
//   - On the master's shutdown notice the OnShutdown hooks run, then the
//     process exits with code 0; if the stream to the master breaks without
//     a notice, it exits with code 1 (unless Options.KeepRunning is set).
//   - Handled messages are acknowledged (Register.acks), so the master can
//     re-deliver what a crashed process had not handled to its successor.
package messenger

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "clutch/gen/clutchv1"
)

// Action names under which the master's own notices reach On handlers.
const (
	EggReady   = "egg-ready"
	EggPids    = "egg-pids"
	AgentStart = "agent-start"
)

const (
	// Handled messages after which an ack goes out even if more are waiting.
	ackEvery = 64
	// Messages without a handler kept before Ready; past this the oldest go.
	earlyBuffer = 4096
	// Frames read but not dispatched yet. A full inbox stops the reader, and
	// HTTP/2 flow control then slows the master's delivery.
	inboxSize = 256
)

// ErrDisconnected is returned by calls made after the stream to the master
// has ended, and by sends whose result was lost with it.
var ErrDisconnected = errors.New("clutch: the connection to the master is closed")

// Identity is who this process is, as the master sees it (its welcome).
type Identity struct {
	Role        string // "agent" or "app"
	WorkerID    uint32 // the app worker's slot, 1..N; 0 for the agent
	Pid         uint32 // the pid SendTo uses for this process
	MasterPid   uint32
	Workers     uint32 // N, the number of app workers
	Incarnation uint32 // how many processes have held this slot, this one included
}

// Origin is who sent a message.
type Origin struct {
	Role     string // "agent", "app" or "master"
	Pid      uint32
	WorkerID uint32 // the sender's slot when it is an app worker, else 0
}

// Message is a message delivered to this process.
type Message struct {
	Action string
	// Data is the payload exactly as sent: UTF-8 JSON by convention.
	Data []byte
	From Origin
}

// Decode reads the payload as JSON into v (empty data reads as null).
// Numbers decoded into an interface value are json.Number, so large
// integers stay exact.
func (m *Message) Decode(v any) error {
	data := m.Data
	if len(data) == 0 {
		data = []byte("null")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("clutch: cannot decode the data of %q: %w", m.Action, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("clutch: cannot decode the data of %q: trailing data after the JSON value", m.Action)
	}
	return nil
}

// Raw is a payload that is sent exactly as it is, without JSON encoding.
type Raw []byte

// Receipt is what the master did with a send that reached every target.
type Receipt struct {
	Delivered uint32 // processes it was handed to
	Held      uint32 // processes it is held for until they register
}

// Undelivered is one target a send did not reach.
type Undelivered struct {
	// NotFound (no such pid), Unavailable (no ready app worker for a random
	// send), ResourceExhausted (mailbox full), InvalidArgument.
	Code     codes.Code
	Message  string
	Pid      uint32
	WorkerID uint32
	Role     string // "agent", "app", or "" when unknown
}

// UndeliveredError reports a send that did not reach every target.
type UndeliveredError struct {
	Action    string
	Delivered uint32
	Held      uint32
	Failures  []Undelivered
}

func (e *UndeliveredError) Error() string {
	reasons := make([]string, len(e.Failures))
	for i, f := range e.Failures {
		reasons[i] = fmt.Sprintf("%s: %s", f.Code, f.Message)
	}
	return fmt.Sprintf("clutch: %q did not reach %d target(s): %s", e.Action, len(e.Failures), strings.Join(reasons, "; "))
}

// Code is the gRPC code of the first failure.
func (e *UndeliveredError) Code() codes.Code {
	if len(e.Failures) == 0 {
		return codes.Unknown
	}
	return e.Failures[0].Code
}

// GRPCStatus makes status.Code(err) and status.FromError(err) work.
func (e *UndeliveredError) GRPCStatus() *status.Status {
	return status.New(e.Code(), e.Error())
}

// SendResult is the master's account of an Emit that missed a target.
type SendResult struct {
	ID          uint64
	Action      string
	Delivered   uint32
	Held        uint32
	Undelivered []Undelivered
}

// Target is where a send goes.
type Target struct {
	route pb.Route
	pid   uint32
}

// The routes of Egg's messenger.
var (
	Broadcast = Target{route: pb.Route_ROUTE_BROADCAST} // the agent and every app, the sender included
	ToApps    = Target{route: pb.Route_ROUTE_APPS}      // every app worker
	ToAgent   = Target{route: pb.Route_ROUTE_AGENT}     // the agent
	Random    = Target{route: pb.Route_ROUTE_RANDOM}    // one ready app (from an app: the agent)
)

// ToPid is Egg's sendTo(pid): the one process with this pid.
func ToPid(pid uint32) Target { return Target{route: pb.Route_ROUTE_PID, pid: pid} }

// Options configure ConnectWith. Zero values take the defaults.
type Options struct {
	Addr, Secret, Role string // default: CLUTCH_ADDR, CLUTCH_SECRET, CLUTCH_ROLE
	// ExpectRole ("agent" or "app") refuses to run in the other role.
	ExpectRole string
	// NoAcks turns acknowledgements off (see Register.acks).
	NoAcks bool
	// KeepRunning stops the library from exiting the process at shutdown or
	// when the stream ends; watch Done instead.
	KeepRunning bool
	// SendBuffer is how many frames may wait to be written (default 1024).
	SendBuffer int
	// Timeout bounds connecting and registering (default 10 s).
	Timeout time.Duration
	// Logger (default slog.Default()).
	Logger *slog.Logger
}

type handler struct {
	fn   func(*Message)
	once bool
}

// Client is one child's attachment to the master. Its methods are safe for
// concurrent use.
type Client struct {
	identity Identity
	log      *slog.Logger
	conn     *grpc.ClientConn
	cancel   context.CancelFunc
	stream   pb.Messenger_AttachClient
	exit     bool

	out    chan *pb.ClientFrame
	inbox  chan *pb.ServerFrame
	ended  chan struct{} // closed when the stream has ended
	done   chan struct{} // Done(): closed after ended unless the library exits the process
	nextID atomic.Uint64

	mu          sync.Mutex
	pending     map[uint64]chan *pb.SendResult
	changes     []change
	undelivered func(SendResult)
	hooks       []func(context.Context)
	readySent   bool
	eggReady    bool
	eggReadyCh  chan struct{}
	eggPids     []uint32
	grace       time.Duration
	noticed     bool
	changed     chan struct{}
}

type change struct {
	action        string
	handler       handler
	stopBuffering bool
}

// Connect connects with the environment the master provides and registers.
func Connect(ctx context.Context) (*Client, error) {
	return ConnectWith(ctx, Options{})
}

func env(name string) (string, error) {
	v, ok := os.LookupEnv(name)
	if !ok {
		return "", fmt.Errorf("clutch: environment variable %s is not set: is this process running under the Clutch master?", name)
	}
	return v, nil
}

// ConnectWith connects and registers with explicit options. A refused
// registration returns an error whose status.Code is the master's
// (Unauthenticated, PermissionDenied, AlreadyExists, InvalidArgument).
func ConnectWith(ctx context.Context, opts Options) (*Client, error) {
	var err error
	fill := func(v *string, name string) {
		if *v == "" && err == nil {
			*v, err = env(name)
		}
	}
	fill(&opts.Addr, "CLUTCH_ADDR")
	fill(&opts.Secret, "CLUTCH_SECRET")
	fill(&opts.Role, "CLUTCH_ROLE")
	if err != nil {
		return nil, err
	}
	var role pb.Role
	switch opts.Role {
	case "agent":
		role = pb.Role_ROLE_AGENT
	case "app":
		role = pb.Role_ROLE_APP
	default:
		return nil, fmt.Errorf("clutch: CLUTCH_ROLE=%q: expected \"agent\" or \"app\"", opts.Role)
	}
	if opts.ExpectRole != "" && opts.ExpectRole != opts.Role {
		return nil, fmt.Errorf("clutch: this program is a %s, but the master launched it as %s", opts.ExpectRole, opts.Role)
	}
	if opts.SendBuffer <= 0 {
		opts.SendBuffer = 1024
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}

	conn, err := grpc.NewClient("passthrough:///"+opts.Addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
	if err != nil {
		return nil, fmt.Errorf("clutch: CLUTCH_ADDR=%q: %w", opts.Addr, err)
	}
	// The stream lives until Close or the end of the process, not the
	// caller's ctx; ctx and Timeout bound only the registration.
	streamCtx, cancel := context.WithCancel(context.Background())
	fail := func(err error) (*Client, error) {
		cancel()
		conn.Close()
		return nil, err
	}
	timer := time.AfterFunc(opts.Timeout, cancel)
	stop := context.AfterFunc(ctx, cancel)
	stream, err := pb.NewMessengerClient(conn).Attach(streamCtx, grpc.WaitForReady(true))
	if err != nil {
		return fail(fmt.Errorf("clutch: cannot reach the master at %s: %w", opts.Addr, err))
	}
	// The master answers the call only after it has read this frame.
	reg := &pb.ClientFrame{Kind: &pb.ClientFrame_Register{Register: &pb.Register{Secret: opts.Secret, Role: role, Acks: !opts.NoAcks}}}
	if err := stream.Send(reg); err != nil && err != io.EOF {
		return fail(fmt.Errorf("clutch: cannot register: %w", err))
	}
	first, err := stream.Recv()
	// Both must be disarmed: either one firing from now on would cancel
	// the stream.
	timedOut := !timer.Stop()
	cancelled := !stop()
	switch {
	case cancelled:
		return fail(ctx.Err())
	case timedOut:
		return fail(fmt.Errorf("clutch: no answer from the master at %s within %s", opts.Addr, opts.Timeout))
	case err != nil:
		return fail(fmt.Errorf("clutch: the master refused the registration: %w", err))
	}
	w := first.GetWelcome()
	if w == nil {
		return fail(errors.New("clutch: protocol error: the first frame from the master was not `welcome`"))
	}
	c := &Client{
		identity: Identity{
			Role:        roleName(w.GetRole()),
			WorkerID:    w.GetWorkerId(),
			Pid:         w.GetPid(),
			MasterPid:   w.GetMasterPid(),
			Workers:     w.GetWorkers(),
			Incarnation: w.GetIncarnation(),
		},
		log:        opts.Logger,
		conn:       conn,
		cancel:     cancel,
		stream:     stream,
		exit:       !opts.KeepRunning,
		out:        make(chan *pb.ClientFrame, opts.SendBuffer),
		inbox:      make(chan *pb.ServerFrame, inboxSize),
		ended:      make(chan struct{}),
		done:       make(chan struct{}),
		pending:    map[uint64]chan *pb.SendResult{},
		eggReadyCh: make(chan struct{}),
		changed:    make(chan struct{}, 1),
	}
	go c.write()
	go c.read()
	go c.dispatch()
	return c, nil
}

func roleName(r pb.Role) string {
	switch r {
	case pb.Role_ROLE_AGENT:
		return "agent"
	case pb.Role_ROLE_APP:
		return "app"
	case pb.Role_ROLE_MASTER:
		return "master"
	}
	return ""
}

// Identity is who the master says this process is.
func (c *Client) Identity() Identity { return c.identity }

// On calls h for every message with this action, in arrival order.
func (c *Client) On(action string, h func(*Message)) {
	c.change(change{action: action, handler: handler{fn: h}})
}

// Once calls h for the next message with this action only.
func (c *Client) Once(action string, h func(*Message)) {
	c.change(change{action: action, handler: handler{fn: h, once: true}})
}

// OnUndelivered replaces the default handling (a logged warning) of Emits
// that missed a target.
func (c *Client) OnUndelivered(h func(SendResult)) {
	c.mu.Lock()
	c.undelivered = h
	c.mu.Unlock()
}

// OnShutdown runs h at the master's shutdown notice, before the process
// exits with code 0. Its ctx expires when the grace period the master
// announced is over (the master sends SIGTERM then). Hooks run in the
// order they were added; messages are still dispatched meanwhile.
func (c *Client) OnShutdown(h func(ctx context.Context)) {
	c.mu.Lock()
	c.hooks = append(c.hooks, h)
	c.mu.Unlock()
}

// Handler-table changes are applied by the dispatcher before it takes the
// next frame, so a handler registered before a message arrives sees it.
func (c *Client) change(ch change) {
	c.mu.Lock()
	c.changes = append(c.changes, ch)
	c.mu.Unlock()
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// Ready tells the master this process is ready (Egg's app-start /
// agent-start). Idempotent.
func (c *Client) Ready(ctx context.Context) error {
	c.mu.Lock()
	sent := c.readySent
	c.readySent = true
	c.mu.Unlock()
	if sent {
		return nil
	}
	c.change(change{stopBuffering: true})
	return c.frame(ctx, &pb.ClientFrame{Kind: &pb.ClientFrame_Ready{Ready: &pb.Ready{}}})
}

// EggReady waits for egg-ready: every process of the cluster is ready.
func (c *Client) EggReady(ctx context.Context) error {
	select {
	case <-c.eggReadyCh:
		return nil
	default:
	}
	select {
	case <-c.eggReadyCh:
		return nil
	case <-c.ended:
		return ErrDisconnected
	case <-ctx.Done():
		return ctx.Err()
	}
}

// IsEggReady is true once egg-ready has arrived.
func (c *Client) IsEggReady() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.eggReady
}

// EggPids are the pids from the last egg-pids.
func (c *Client) EggPids() []uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]uint32(nil), c.eggPids...)
}

// ShutdownGrace is the grace period of the master's shutdown notice, and
// whether the notice has come.
func (c *Client) ShutdownGrace() (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.grace, c.noticed
}

// Done is closed when the stream to the master has ended. By default the
// library ends the process itself then (code 1, or code 0 once the shutdown
// hooks have run), so Done is closed only with Options.KeepRunning; a main
// that waits on it returns only when the process is not being ended for it.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the stream from this side (useful with Options.KeepRunning).
func (c *Client) Close() error {
	c.mu.Lock()
	c.exit = false
	c.mu.Unlock()
	c.cancel()
	<-c.ended
	return c.conn.Close()
}

// Broadcast is Egg's broadcast: the agent and every app worker, this
// process included.
func (c *Client) Broadcast(ctx context.Context, action string, data any) (Receipt, error) {
	return c.Send(ctx, Broadcast, action, data)
}

// SendToApp is Egg's sendToApp: every app worker (this one too, if it is an app).
func (c *Client) SendToApp(ctx context.Context, action string, data any) (Receipt, error) {
	return c.Send(ctx, ToApps, action, data)
}

// SendToAgent is Egg's sendToAgent: the agent.
func (c *Client) SendToAgent(ctx context.Context, action string, data any) (Receipt, error) {
	return c.Send(ctx, ToAgent, action, data)
}

// SendRandom is Egg's sendRandom: from the agent, one ready app worker the
// master picks (codes.Unavailable if none is ready); from an app, the agent.
func (c *Client) SendRandom(ctx context.Context, action string, data any) (Receipt, error) {
	return c.Send(ctx, Random, action, data)
}

// SendTo is Egg's sendTo(pid): the one process with this pid. An unknown
// pid fails with an *UndeliveredError whose code is codes.NotFound.
func (c *Client) SendTo(ctx context.Context, pid uint32, action string, data any) (Receipt, error) {
	return c.Send(ctx, ToPid(pid), action, data)
}

// Send sends data as JSON to target and waits for the master's account.
func (c *Client) Send(ctx context.Context, target Target, action string, data any) (Receipt, error) {
	payload, err := encode(action, data)
	if err != nil {
		return Receipt{}, err
	}
	id := c.nextID.Add(1)
	result := make(chan *pb.SendResult, 1)
	c.mu.Lock()
	c.pending[id] = result
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}
	if err := c.frame(ctx, sendFrame(id, target, action, payload, true)); err != nil {
		forget()
		return Receipt{}, err
	}
	select {
	case r, ok := <-result:
		if !ok {
			return Receipt{}, ErrDisconnected
		}
		if len(r.GetUndelivered()) > 0 {
			return Receipt{}, &UndeliveredError{Action: action, Delivered: r.GetDelivered(), Held: r.GetHeld(), Failures: failures(r)}
		}
		return Receipt{Delivered: r.GetDelivered(), Held: r.GetHeld()}, nil
	case <-ctx.Done():
		forget()
		return Receipt{}, ctx.Err()
	}
}

// Emit sends without waiting for the master's account: the fast path for
// streams of messages. A missed target is reported to OnUndelivered.
func (c *Client) Emit(ctx context.Context, target Target, action string, data any) error {
	payload, err := encode(action, data)
	if err != nil {
		return err
	}
	return c.frame(ctx, sendFrame(c.nextID.Add(1), target, action, payload, false))
}

func encode(action string, data any) ([]byte, error) {
	if raw, ok := data.(Raw); ok {
		return raw, nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(data); err != nil {
		return nil, fmt.Errorf("clutch: cannot encode the data of %q as JSON: %w", action, err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

func sendFrame(id uint64, t Target, action string, data []byte, wantResult bool) *pb.ClientFrame {
	return &pb.ClientFrame{Kind: &pb.ClientFrame_Send{Send: &pb.Send{
		Id: id, Route: t.route, Pid: t.pid, Action: action, Data: data, WantResult: wantResult,
	}}}
}

func failures(r *pb.SendResult) []Undelivered {
	out := make([]Undelivered, len(r.GetUndelivered()))
	for i, u := range r.GetUndelivered() {
		out[i] = Undelivered{
			Code:     codes.Code(u.GetCode()),
			Message:  u.GetMessage(),
			Pid:      u.GetPid(),
			WorkerID: u.GetWorkerId(),
			Role:     roleName(u.GetRole()),
		}
	}
	return out
}

func (c *Client) frame(ctx context.Context, f *pb.ClientFrame) error {
	select {
	case <-c.ended:
		return ErrDisconnected
	default:
	}
	select {
	case c.out <- f:
		return nil
	case <-c.ended:
		return ErrDisconnected
	case <-ctx.Done():
		return ctx.Err()
	}
}

// write is the stream's only sender (grpc-go streams allow one).
func (c *Client) write() {
	for {
		select {
		case f := <-c.out:
			if err := c.stream.Send(f); err != nil {
				// The reader sees the stream's end and reports it.
				return
			}
		case <-c.ended:
			return
		}
	}
}

func (c *Client) read() {
	for {
		f, err := c.stream.Recv()
		if err != nil {
			c.inbox <- nil
			if err != io.EOF {
				c.log.Debug("clutch: stream to the master failed", "error", err)
			}
			return
		}
		c.inbox <- f
	}
}

// dispatcher state, touched only by the dispatch goroutine.
type dispatcher struct {
	handlers  map[string][]handler
	early     []*Message
	buffering bool
	handled   uint64
	acked     uint64
}

func (c *Client) dispatch() {
	d := &dispatcher{handlers: map[string][]handler{}, buffering: true}
	for {
		c.apply(d)
		var f *pb.ServerFrame
		select {
		case f = <-c.inbox:
			c.flushAck(d, false)
		default:
			c.flushAck(d, true)
			select {
			case f = <-c.inbox:
			case <-c.changed:
				continue
			}
		}
		if f == nil {
			c.streamEnded()
			return
		}
		c.handle(d, f)
	}
}

func (c *Client) apply(d *dispatcher) {
	c.mu.Lock()
	changes := c.changes
	c.changes = nil
	c.mu.Unlock()
	for _, ch := range changes {
		if ch.stopBuffering {
			d.buffering = false
			d.early = nil
			continue
		}
		d.handlers[ch.action] = append(d.handlers[ch.action], ch.handler)
		// Replay what arrived for this action before it had a handler.
		var rest []*Message
		var matching []*Message
		for _, m := range d.early {
			if m.Action == ch.action {
				matching = append(matching, m)
			} else {
				rest = append(rest, m)
			}
		}
		d.early = rest
		for _, m := range matching {
			c.deliver(d, m)
		}
	}
}

func (c *Client) flushAck(d *dispatcher, caughtUp bool) {
	behind := d.handled - d.acked
	if behind == 0 || (!caughtUp && behind < ackEvery) {
		return
	}
	ack := &pb.ClientFrame{Kind: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seq: d.handled}}}
	select {
	case c.out <- ack:
		d.acked = d.handled
	default: // the send queue is full: a later ack covers these
	}
}

func (c *Client) synthetic(action string, data []byte) *Message {
	return &Message{Action: action, Data: data, From: Origin{Role: "master", Pid: c.identity.MasterPid}}
}

func (c *Client) handle(d *dispatcher, f *pb.ServerFrame) {
	switch k := f.GetKind().(type) {
	case *pb.ServerFrame_Message:
		m := k.Message
		c.deliver(d, &Message{
			Action: m.GetAction(),
			Data:   m.GetData(),
			From:   Origin{Role: roleName(m.GetFromRole()), Pid: m.GetFromPid(), WorkerID: m.GetFromWorkerId()},
		})
		d.handled = max(d.handled, m.GetSeq())
	case *pb.ServerFrame_EggReady:
		c.mu.Lock()
		if !c.eggReady {
			c.eggReady = true
			close(c.eggReadyCh)
		}
		c.mu.Unlock()
		c.deliver(d, c.synthetic(EggReady, []byte("null")))
	case *pb.ServerFrame_EggPids:
		pids := append([]uint32{}, k.EggPids.GetPids()...)
		c.mu.Lock()
		c.eggPids = pids
		c.mu.Unlock()
		data, _ := json.Marshal(pids)
		c.deliver(d, c.synthetic(EggPids, data))
	case *pb.ServerFrame_AgentStart:
		c.deliver(d, c.synthetic(AgentStart, []byte("null")))
	case *pb.ServerFrame_SendResult:
		c.sendResult(k.SendResult)
	case *pb.ServerFrame_Shutdown:
		c.shutdown(time.Duration(k.Shutdown.GetGraceMs()) * time.Millisecond)
	case *pb.ServerFrame_Welcome:
		c.log.Warn("clutch: ignoring a second welcome from the master")
	}
}

func (c *Client) deliver(d *dispatcher, m *Message) {
	hs := d.handlers[m.Action]
	if len(hs) == 0 {
		if d.buffering {
			if len(d.early) >= earlyBuffer {
				c.log.Warn("clutch: no handler before Ready: early-message buffer full, dropping the oldest", "action", d.early[0].Action)
				d.early = d.early[1:]
			}
			d.early = append(d.early, m)
		}
		return
	}
	keep := make([]handler, 0, len(hs))
	for _, h := range hs {
		if !h.once {
			keep = append(keep, h)
		}
	}
	if len(keep) == 0 {
		delete(d.handlers, m.Action)
	} else {
		d.handlers[m.Action] = keep
	}
	for _, h := range hs {
		c.call(m, h.fn)
	}
}

// call runs a handler; a panic is logged instead of stopping dispatch.
func (c *Client) call(m *Message, fn func(*Message)) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("clutch: a message handler panicked; dispatch goes on", "action", m.Action, "panic", r)
		}
	}()
	fn(m)
}

func (c *Client) sendResult(r *pb.SendResult) {
	c.mu.Lock()
	waiter, ok := c.pending[r.GetId()]
	delete(c.pending, r.GetId())
	h := c.undelivered
	c.mu.Unlock()
	if ok {
		waiter <- r
		return
	}
	if len(r.GetUndelivered()) == 0 {
		return
	}
	result := SendResult{ID: r.GetId(), Action: r.GetAction(), Delivered: r.GetDelivered(), Held: r.GetHeld(), Undelivered: failures(r)}
	if h == nil {
		err := &UndeliveredError{Action: result.Action, Delivered: result.Delivered, Held: result.Held, Failures: result.Undelivered}
		c.log.Warn("clutch: a message did not reach every target", "error", err)
		return
	}
	func() {
		defer func() {
			if p := recover(); p != nil {
				c.log.Error("clutch: the OnUndelivered handler panicked", "panic", p)
			}
		}()
		h(result)
	}()
}

func (c *Client) shutdown(grace time.Duration) {
	c.mu.Lock()
	if c.noticed {
		c.mu.Unlock()
		return
	}
	c.noticed = true
	c.grace = grace
	hooks := c.hooks
	c.hooks = nil
	c.mu.Unlock()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), grace)
		defer cancel()
		for _, h := range hooks {
			func() {
				defer func() {
					if p := recover(); p != nil {
						c.log.Error("clutch: a shutdown hook panicked", "panic", p)
					}
				}()
				h(ctx)
			}()
		}
		c.mu.Lock()
		exit := c.exit
		c.mu.Unlock()
		if exit {
			c.log.Info("clutch: the master is stopping the cluster; exiting")
			os.Exit(0)
		}
	}()
}

func (c *Client) streamEnded() {
	c.mu.Lock()
	close(c.ended)
	for id, w := range c.pending {
		close(w)
		delete(c.pending, id)
	}
	noticed, exit := c.noticed, c.exit
	c.mu.Unlock()
	if !exit {
		close(c.done)
		return
	}
	// Done stays open: a main waiting on it must not return (and end the
	// process with code 0) before the exit below or the shutdown hooks.
	if noticed {
		// The hooks are still running; the master's SIGTERM ends them if
		// they overrun.
		c.log.Info("clutch: the master closed the stream during shutdown")
		return
	}
	c.log.Error("clutch: lost the connection to the master; exiting")
	os.Exit(1)
}
