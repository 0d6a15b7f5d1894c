"""The ITS lab: tools that drive a guest's ITS through a running machine, above kvmits.machine
and using only its public interface (Machine, MachineConfig, Machine.its, Machine.agent).

- its_lab: ItsLab, a machine with the guest agent whose GIC and ITS are set up by the guest;
- guest_driver: the guest's GIC/ITS driver, written in Python and executed by the agent;
- its_program: ITS command programs (a text format) and their runner;
- differential: the same seeded programs on both ITSes, their states compared;
- linux_guest: the nested Linux guest (a kernel and an initramfs that runs one job script), the
  initrd for a job and the report parsed from the console; pure, no machine.
"""
