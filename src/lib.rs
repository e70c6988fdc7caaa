//! # crmsync
//!
//! A verified core for the two-way synchronisation between a CRM server and a user's Outlook
//! mailbox, modelled on the Outlook client of Microsoft Dynamics CRM 2011.
//!
//! The core is *sans-IO*: [`plan()`] takes the queue of changes from both sides, the id mapping
//! and the [`Policies`], and returns the ordered [`Action`]s of one sync run; [`settle()`] takes
//! the state and one action's [`Outcome`] and returns the next state. Neither reads a clock, a
//! file or a socket. The SQLite stores, the mailbox and the CRM service are adapters around it
//! (feature `sqlite`), and the `crmsync` tool drives them (feature `cli`).
//!
//! What it is not: an Outlook add-in or a CRM server. It decides and records; the adapters write.
//!
//! The names follow `DOMAIN.md`; `ARCHITECTURE.md` maps the modules.

#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[cfg(feature = "sqlite")]
pub mod cache;
pub mod change;
pub mod clock;
#[cfg(feature = "sqlite")]
pub mod demo;
#[cfg(feature = "sqlite")]
pub mod engine;
pub mod entity;
pub mod fields;
pub mod ids;
pub mod index;
pub mod mailbox;
#[cfg(feature = "sqlite")]
pub mod mailbox_file;
pub mod mapping;
pub mod merge;
pub mod mutant;
pub mod plan;
pub mod policy;
mod prefetch;
pub mod queue;
#[cfg(feature = "sqlite")]
pub mod reports;
#[cfg(feature = "sqlite")]
pub mod server;
pub mod settle;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub mod summary;

pub use change::{
    ActivityStatus, Change, ChangeError, ChangeKind, ChangeOp, ChangeStamp, DeleteReason, Record, RecordKey,
    Role, Side,
};
pub use entity::{EntityGroup, ObjectTypeCode, UnknownObjectTypeCode};
pub use fields::{FieldNames, FieldPatch, Fields, FieldsError};
pub use ids::{CrmId, EntryId, GlobalObjectId, IdError, VersionNumber};
pub use mailbox::{
    ChangePage, Mailbox, MailboxChange, MailboxCursor, MailboxError, MailboxItem, MemoryMailbox, NewItem,
    Tracking, UserEdits,
};
#[cfg(feature = "sqlite")]
pub use mailbox_file::{MailboxOpenError, SqliteMailbox};
pub use mapping::{Mapping, MappingEntry, MappingError};
pub use merge::{Merged, merge};
pub use plan::{
    Action, ActionOp, ActionOrder, DecisionRow, DropReason, LinkChange, PendingLink, Plan, PlanError,
    RecordError, plan,
};
pub use policy::{
    CrmDeletePolicy, DeleteRule, FieldConflictPolicy, FieldDirections, FieldSyncDirection, MassDeleteGuard,
    OutlookDeletePolicy, Policies, UpdateVsDeletePolicy,
};
pub use queue::{CoalesceError, Coalesced, Net, Queue, QueueEntry, QueueError, QueueId, QueueIds, coalesce};
pub use settle::{Applied, IgnoredError, ItemError, ItemErrorKind, Outcome, SyncState, settle, settle_all};
#[cfg(feature = "sqlite")]
pub use summary::{Counts, SummaryError, SyncSummary};
