// Command conformance-worker is the Go conformance worker: it carries out any
// conformance scenario.
//
// The conformance suite (tests/conformance/) launches it as an app worker. A
// controller agent drives it through the messenger itself: commands arrive
// as messages with action "conformance.command"; everything this worker
// observes goes back to the agent as "conformance.event" messages, in the
// order it happened. The protocol is described in
// tests/conformance/README.md; the Rust, Python and Node workers speak it too.
//
// Environment, besides the master's CLUTCH_*:
//
//	CONFORMANCE_ACTIONS       comma-separated actions to report (On)
//	CONFORMANCE_MANUAL_READY  1: call Ready only on the "ready" command
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc/status"

	"clutch/messenger"
)

const (
	commandAction = "conformance.command"
	eventAction   = "conformance.event"
)

type event map[string]any

type command struct {
	Op      string          `json:"op"`
	ID      json.Number     `json:"id"`
	Action  string          `json:"action"`
	Route   string          `json:"route"`
	Pid     uint32          `json:"pid"`
	Data    json.RawMessage `json:"data"`
	Raw     *string         `json:"raw"`
	Count   *int            `json:"count"`
	Seq     bool            `json:"seq"`
	Confirm *bool           `json:"confirm"`
	Code    int             `json:"code"`
	Secret  string          `json:"secret"`
	Role    string          `json:"role"`
}

func messageEvent(msg *messenger.Message, handler string) event {
	var data any
	if err := msg.Decode(&data); err != nil {
		data = map[string]any{"decode_error": err.Error(), "raw": string(msg.Data)}
	}
	return event{
		"event":          "message",
		"handler":        handler,
		"action":         msg.Action,
		"data":           data,
		"from_role":      msg.From.Role,
		"from_pid":       msg.From.Pid,
		"from_worker_id": msg.From.WorkerID,
	}
}

func errorEvent(id json.Number, err error) event {
	e := event{"event": "sent", "id": id, "ok": false, "message": err.Error(), "error_type": fmt.Sprintf("%T", err)}
	// The canonical gRPC code, from the library's own error value.
	var undelivered *messenger.UndeliveredError
	if errors.As(err, &undelivered) {
		e["code"] = uint32(status.Code(err))
		e["code_name"] = status.Code(err).String()
	} else {
		e["code"] = nil
		e["code_name"] = fmt.Sprintf("%T", err)
	}
	return e
}

func main() {
	ctx := context.Background()
	m, err := messenger.ConnectWith(ctx, messenger.Options{ExpectRole: "app"})
	if err != nil {
		slog.Error("conformance worker: cannot connect", "error", err)
		os.Exit(1)
	}
	// Unbounded on purpose (a test program): handlers must never block, and
	// the controller counts every event.
	reports := newQueue[event]()
	report := reports.push

	watch := func(action, kind string) {
		h := func(msg *messenger.Message) { report(messageEvent(msg, kind)) }
		if kind == "once" {
			m.Once(action, h)
		} else {
			m.On(action, h)
		}
	}
	// Handlers first, before Ready: nothing the master sends is missed.
	for _, action := range strings.Split(os.Getenv("CONFORMANCE_ACTIONS"), ",") {
		if action = strings.TrimSpace(action); action != "" {
			watch(action, "on")
		}
	}
	m.On(messenger.EggReady, func(*messenger.Message) { report(event{"event": "egg-ready"}) })
	m.On(messenger.EggPids, func(msg *messenger.Message) {
		var pids []uint32
		_ = msg.Decode(&pids)
		report(event{"event": "egg-pids", "pids": pids})
	})
	m.On(messenger.AgentStart, func(*messenger.Message) { report(event{"event": "agent-start"}) })
	m.OnUndelivered(func(r messenger.SendResult) {
		codes := make([]uint32, len(r.Undelivered))
		texts := make([]string, len(r.Undelivered))
		for i, u := range r.Undelivered {
			codes[i] = uint32(u.Code)
			texts[i] = u.Message
		}
		report(event{"event": "undelivered", "action": r.Action, "codes": codes, "messages": texts, "delivered": r.Delivered, "held": r.Held})
	})
	commands := newQueue[*messenger.Message]()
	m.On(commandAction, func(msg *messenger.Message) { commands.push(msg) })
	m.OnShutdown(func(ctx context.Context) {
		grace, _ := m.ShutdownGrace()
		// Awaited, so the agent has it before this process exits.
		if _, err := m.SendToAgent(ctx, eventAction, event{"event": "shutdown", "grace_ms": grace.Milliseconds()}); err != nil {
			slog.Error("conformance worker: shutdown report", "error", err)
		}
	})

	id := m.Identity()
	report(event{
		"event": "hello", "lang": "go", "role": id.Role, "worker_id": id.WorkerID, "pid": id.Pid,
		"master_pid": id.MasterPid, "workers": id.Workers, "incarnation": id.Incarnation,
	})

	go func() {
		// Numbered, so that the controller can drop a report that the master
		// re-delivered to a restarted agent (at-least-once across an agent's
		// incarnations, with acks).
		for n := 1; ; n++ {
			e := reports.pop()
			e["n"] = n
			if err := m.Emit(ctx, messenger.ToAgent, eventAction, e); err != nil {
				return
			}
		}
	}()
	go func() {
		for {
			msg := commands.pop()
			var cmd command
			if err := msg.Decode(&cmd); err != nil {
				report(event{"event": "error", "message": err.Error()})
				continue
			}
			execute(ctx, m, cmd, report, watch)
		}
	}()

	if strings.TrimSpace(os.Getenv("CONFORMANCE_MANUAL_READY")) != "1" {
		if err := m.Ready(ctx); err != nil {
			slog.Error("conformance worker: ready", "error", err)
			os.Exit(1)
		}
	}
	// The library exits the process at shutdown or when the master goes.
	<-m.Done()
}

// tally counts a high-volume action's messages in the worker, checking their
// "seq", so that a flood needs no report per message. Only the dispatcher
// (handlers) and the command goroutine touch it, under mu.
type tally struct {
	mu              sync.Mutex
	count           int
	inOrder         bool
	firstOutOfOrder any
}

var tallies sync.Map // action -> *tally

func startTally(m *messenger.Client, action string) {
	t := &tally{inOrder: true}
	tallies.Store(action, t)
	m.On(action, func(msg *messenger.Message) {
		var data struct {
			Seq *int `json:"seq"`
		}
		_ = msg.Decode(&data)
		t.mu.Lock()
		defer t.mu.Unlock()
		if (data.Seq == nil || *data.Seq != t.count) && t.inOrder {
			t.inOrder = false
			t.firstOutOfOrder = map[string]any{"index": t.count, "data": string(msg.Data)}
		}
		t.count++
	})
}

func execute(ctx context.Context, m *messenger.Client, cmd command, report func(event), watch func(string, string)) {
	switch cmd.Op {
	case "tally":
		startTally(m, cmd.Action)
		report(event{"event": "subscribed", "id": cmd.ID, "action": cmd.Action, "handler": "tally"})
	case "tally-report":
		e := event{"event": "tally", "id": cmd.ID, "action": cmd.Action, "count": 0, "in_order": true, "first_out_of_order": nil}
		if v, ok := tallies.Load(cmd.Action); ok {
			t := v.(*tally)
			t.mu.Lock()
			e["count"], e["in_order"], e["first_out_of_order"] = t.count, t.inOrder, t.firstOutOfOrder
			t.mu.Unlock()
		}
		report(e)
	case "ready":
		if err := m.Ready(ctx); err != nil {
			report(event{"event": "error", "id": cmd.ID, "message": err.Error()})
			return
		}
		report(event{"event": "ready-sent", "id": cmd.ID})
	case "send":
		send(ctx, m, cmd, report)
	case "on", "once":
		watch(cmd.Action, cmd.Op)
		report(event{"event": "subscribed", "id": cmd.ID, "action": cmd.Action, "handler": cmd.Op})
	case "connect":
		// A second registration, expected to be refused: the code comes from
		// the library's error (status.Code).
		secret := cmd.Secret
		if secret == "own" {
			secret = os.Getenv("CLUTCH_SECRET")
		}
		role := cmd.Role
		if role == "" {
			role = "app"
		}
		other, err := messenger.ConnectWith(ctx, messenger.Options{Secret: secret, Role: role, KeepRunning: true})
		if err != nil {
			code := status.Code(err)
			report(event{"event": "connect", "id": cmd.ID, "ok": false, "code": uint32(code), "code_name": code.String(), "message": err.Error()})
			return
		}
		_ = other.Close()
		report(event{"event": "connect", "id": cmd.ID, "ok": true})
	case "state":
		id := m.Identity()
		report(event{
			"event": "state", "id": cmd.ID, "egg_ready": m.IsEggReady(), "egg_pids": m.EggPids(),
			"role": id.Role, "worker_id": id.WorkerID, "pid": id.Pid, "master_pid": id.MasterPid,
			"workers": id.Workers, "incarnation": id.Incarnation,
		})
	case "exit":
		os.Exit(cmd.Code)
	default:
		report(event{"event": "error", "id": cmd.ID, "message": fmt.Sprintf("unknown op %q", cmd.Op)})
	}
}

func send(ctx context.Context, m *messenger.Client, cmd command, report func(event)) {
	count := 1
	if cmd.Count != nil {
		count = *cmd.Count
	}
	confirm := cmd.Confirm == nil || *cmd.Confirm
	var target messenger.Target
	switch cmd.Route {
	case "broadcast":
		target = messenger.Broadcast
	case "apps":
		target = messenger.ToApps
	case "agent":
		target = messenger.ToAgent
	case "random":
		target = messenger.Random
	case "pid":
		target = messenger.ToPid(cmd.Pid)
	default:
		report(event{"event": "error", "id": cmd.ID, "message": fmt.Sprintf("unknown route %q", cmd.Route)})
		return
	}
	// The payload is decoded (exact numbers) and encoded again by the
	// library, as a Go program would hold and send it.
	var value any
	if len(cmd.Data) > 0 {
		if err := (&messenger.Message{Action: cmd.Action, Data: cmd.Data}).Decode(&value); err != nil {
			report(event{"event": "error", "id": cmd.ID, "message": err.Error()})
			return
		}
	}
	for i := 0; i < count; i++ {
		var data any = value
		if cmd.Raw != nil {
			data = messenger.Raw(*cmd.Raw)
		} else if cmd.Seq {
			data = map[string]any{"seq": i, "data": value}
		}
		if !confirm {
			if err := m.Emit(ctx, target, cmd.Action, data); err != nil {
				report(errorEvent(cmd.ID, err))
				return
			}
			continue
		}
		var receipt messenger.Receipt
		var err error
		switch cmd.Route {
		case "broadcast":
			receipt, err = m.Broadcast(ctx, cmd.Action, data)
		case "apps":
			receipt, err = m.SendToApp(ctx, cmd.Action, data)
		case "agent":
			receipt, err = m.SendToAgent(ctx, cmd.Action, data)
		case "random":
			receipt, err = m.SendRandom(ctx, cmd.Action, data)
		case "pid":
			receipt, err = m.SendTo(ctx, cmd.Pid, cmd.Action, data)
		}
		if err != nil {
			report(errorEvent(cmd.ID, err))
			continue
		}
		report(event{"event": "sent", "id": cmd.ID, "ok": true, "delivered": receipt.Delivered, "held": receipt.Held})
	}
	if !confirm {
		report(event{"event": "sent", "id": cmd.ID, "ok": true, "count": count})
	}
}
