package qmp

import "context"

// VCPUs returns the number of vCPUs of the VM, the default queue count
// of a multiqueue NIC (one queue pair per vCPU).
//
// Equivalent to: {"execute": "query-cpus-fast"} (HMP: info cpus)
func (c *Client) VCPUs(ctx context.Context) (int, error) {
	var cpus []struct {
		CPUIndex int `json:"cpu-index"`
	}
	if err := c.runInto(ctx, "query-cpus-fast", "", nil, &cpus); err != nil {
		return 0, err
	}
	return len(cpus), nil
}
