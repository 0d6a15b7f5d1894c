"""The guest agent, host side: the mailbox protocol (protocol: every name of guests/include/
mailbox.h, and the errors) and the typed host API (host). The mailbox device itself is
kvmits.machine.devices.agent_mailbox. See guests/README.md."""

from kvmits.machine.agent.host import Agent, AgentClient
from kvmits.machine.agent.protocol import *  # noqa: F401,F403 - the protocol's names, as `A.MB_REQ`
from kvmits.machine.devices.agent_mailbox import AgentMailbox, Request
