// Command worker is an app worker in Go: the Egg idiom, app side.
//
// It answers every "ping" from the agent with a "pong" to the agent, the same
// protocol as the Rust example worker, so it runs with the Rust example agent
// (see README.md and cluster.example.toml).
package main

import (
	"context"
	"log/slog"
	"os"

	"clutch/messenger"
)

type ping struct {
	Round uint64 `json:"round"`
}

type pong struct {
	Round  uint64 `json:"round"`
	Worker uint32 `json:"worker"`
}

func main() {
	ctx := context.Background()
	worker, err := messenger.ConnectWith(ctx, messenger.Options{ExpectRole: "app"})
	if err != nil {
		slog.Error("cannot connect to the master", "error", err)
		os.Exit(1)
	}
	me := worker.Identity().WorkerID

	worker.On("ping", func(msg *messenger.Message) {
		var p ping
		if err := msg.Decode(&p); err != nil {
			slog.Warn("bad ping", "error", err)
			return
		}
		slog.Info("ping", "round", p.Round)
		// Handlers run on the dispatcher: wait for the send's result elsewhere.
		go func() {
			if _, err := worker.SendToAgent(ctx, "pong", pong{Round: p.Round, Worker: me}); err != nil {
				slog.Warn("pong not sent", "error", err)
			}
		}()
	})
	worker.OnShutdown(func(context.Context) { slog.Info("the master is stopping the cluster; bye") })

	if err := worker.Ready(ctx); err != nil {
		slog.Error("ready", "error", err)
		os.Exit(1)
	}
	if err := worker.EggReady(ctx); err != nil {
		slog.Error("egg-ready", "error", err)
		os.Exit(1)
	}
	slog.Info("worker is up; every process is ready", "worker", me, "pid", worker.Identity().Pid)
	// The library exits the process when the master closes the stream.
	<-worker.Done()
}
