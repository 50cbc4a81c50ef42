package node

import (
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"

	"github.com/obdproject/obd/internal/cri"
)

// serveCRI serves the CRI image-service proxy on [cri] address when [cri] enable is set, until stop is called. Its pulls' credentials go to the store the registry clients ask first.
func (s *Service) serveCRI() (stop func(), err error) {
	c := s.cfg.CRI
	if !c.Enable {
		return func() {}, nil
	}
	p, err := cri.NewProxy(c.ContainerdAddress, s.pulls, s.log)
	if err != nil {
		return nil, err
	}
	l, err := listen(c.Address)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("CRI proxy ([cri] address): %w", err)
	}
	srv := grpc.NewServer()
	p.Register(srv)
	go func() {
		if err := srv.Serve(l); err != nil {
			s.log.Error("CRI image service stopped", "address", c.Address, "error", err)
		}
	}()
	s.log.Info("serving CRI image service", "address", c.Address, "containerd", c.ContainerdAddress)
	return func() {
		srv.Stop() // kubelet retries pulls; a pull cut short by the shutdown is not waited for
		p.Close()
		if err := os.Remove(c.Address); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("remove socket", "error", err)
		}
	}, nil
}
