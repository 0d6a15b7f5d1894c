"""The device models a machine puts on its MMIO bus: one small file each (see docs/machine.md).

- pl011: the PL011 UART (the console).
- agent_mailbox: the guest agent's mailbox, through which the host drives a guest program.

PCI and virtio devices will go here too.
"""
