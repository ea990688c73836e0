//! The job states. Each is a zero-sized type that says what is already true of the job.
//!
//! In order: [`Polled`] → [`Setup`] → [`Provisioned`] → [`FirmwareUpdated`] → [`Tested`] →
//! [`Allocated`] → [`Reserved`] → [`Cleaned`], with [`Aborted`] reachable from every
//! transition before cleanup. The only way out of `Aborted` is cleanup.

/// Marker trait of the job states; sealed, so no state can be added outside this module.
pub trait State: sealed::Sealed {
    /// The state's name as it appears in the transition table and the diagrams.
    const NAME: &'static str;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! states {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            #[derive(Debug)]
            pub struct $name {
                _private: (),
            }
            impl sealed::Sealed for $name {}
            impl State for $name {
                const NAME: &'static str = stringify!($name);
            }
        )*
    };
}

states! {
    /// The job was taken from a queue and its run directory exists; no phase has run.
    Polled,
    /// The setup phase ran (or was skipped) without ending the job.
    Setup,
    /// The provision phase ran (or was skipped) without ending the job.
    Provisioned,
    /// The firmware_update phase ran (or was skipped) without ending the job.
    FirmwareUpdated,
    /// The test phase ran (or was skipped). A failing test does not end the job.
    Tested,
    /// The allocate phase ran (or was skipped) without ending the job.
    Allocated,
    /// The reserve phase ran (or was skipped) without ending the job.
    Reserved,
    /// A phase ended the forward path (failure, timeout, cancellation, shutdown, recovery
    /// failure): only cleanup can follow.
    Aborted,
    /// Cleanup has run (or was skipped because no cleanup command is configured). Terminal:
    /// the only state an outcome can be taken from.
    Cleaned,
}
