//! A small KVM VMM on stock ioctls (rust-vmm's `kvm-ioctls`, `vm-memory`)
//! that serves KVMI through `ukvmi-endpoint`: it is the endpoint's backend.
//!
//! * `memory`: guest RAM in a memfd, memslot 0.
//! * `loader`: a built-in guest or a kernel image (ELF64 or flat) into RAM.
//! * `boot`: the guest ABI's starting state (GDT, identity page tables,
//!   64-bit ring-0 registers).
//! * `error`: the typed errors of creating a VM (`Error`, `ConfigError`,
//!   `ImageError`, `LoadError`, `SetupError`).
//! * `exit`: how a VM ends (`Exit`) and the typed reasons of a crash or a
//!   failure (`Crash`, `Failure`).
//! * `vm`: creating and running the VM. `vm::config`: what a VM is made
//!   from and its limits; `vm::shared`: the state all threads share (the
//!   endpoint's `VmBackend`), serial and power-off; `vm::host`: probing
//!   what KVM offers as the endpoint's `HostFeatures`; `vm::connection`: the
//!   introspection connection with handshake and reconnects.
//! * `vcpu`: one thread per vCPU; runs KVMI jobs between guest entries and
//!   implements `VcpuBackend` with vCPU ioctls on its own thread. Split by
//!   exit family: `run` (loop, exit decoding), `debug` (guest debug, the
//!   trap-flag drain), `events` (breakpoint, single-step, hypercall, MSR),
//!   `page_access` (the PF event), `ports` (port devices), `virt`
//!   (guest-virtual reads), `backend` and `mtrr` (the `VcpuBackend`).
//! * `linux`: booting a Linux kernel (telling one from the ABI's images,
//!   PVH for a vmlinux, the 64-bit protocol for a bzImage, e820, the
//!   command line, CPUID, irqchip/PIT/LAPIC); `devices`: a Linux guest's
//!   port devices (16550 with its IRQ, CMOS/RTC, i8042, 0xcf9, PCI
//!   configuration that finds nothing); `vcpu::complete`: the instructions
//!   KVM's emulator lacks that the VMM completes for it.
//! * `kick`: signal + `immediate_exit` to pull a vCPU out of `KVM_RUN`.
//! * `trap_flag`: keeps KVM's single-step TF out of exception frames.
//! * `msr_filter`: the KVM MSR filter behind MSR events.
//! * `page_access`: page restrictions (`KVMI_VM_SET_PAGE_ACCESS`) as a
//!   memslot layout (`layout`), applied through a `SlotSink` (`sink`) with
//!   every vCPU held out of guest mode (`gate`); the vCPU side of the PF
//!   event is in `vcpu::page_access`.
//! * `page_tables`: finds the pages the CPU reads by itself (the guest's
//!   page tables from each vCPU's CR3, its GDT/IDT/LDT/TSS), which must
//!   keep their memslot.
//!
//! Guests follow the ABI of `ukvmi-guests`: entered in 64-bit ring 0 with
//! identity paging, serial at 0x3f8, power-off at 0xf4, "start vCPU" at 0x600.
//! A Linux kernel (`Image::Linux`) gets a small PC instead: one vCPU, no
//! ACPI/MP tables, no PCI; it ends the VM by resetting (`Exit::Reset`).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]
#![warn(missing_debug_implementations)]

mod boot;
mod convert;
mod devices;
mod error;
mod exit;
mod kick;
mod linux;
mod loader;
mod memory;
mod msr_filter;
mod page_access;
mod page_tables;
mod trap_flag;
mod vcpu;
mod vm;

pub use error::{
    ConfigError, Error, ImageError, LinuxError, LoadError, Result, SetupError, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
};
pub use exit::{Crash, CrashEvent, Failure, FailureCause, FatalExit, PfAccess};
pub use linux::{kernel_kind, KernelKind, LINUX_MAX_MEMORY_MIB};
pub use ukvmi_endpoint::{Dialect, PermissionError};
pub use vm::{
    host_capabilities, BuiltinImage, Exit, HostKind, Image, IntrospectConfig, SerialSink, StopHandle, Vm, VmConfig,
};
