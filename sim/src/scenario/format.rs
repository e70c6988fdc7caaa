//! The scenario file format: serde types that refuse unknown fields, with a JSON Schema derived
//! from them (`sim/scenario.schema.json`). Users, machines, records, items and meetings are named
//! by short labels; the runner maps them to ids.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// One scenario: a small world and a script of steps.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The schema this file follows (for editors); ignored.
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    /// What the scenario shows, in a sentence or two.
    pub description: String,
    /// The CRM users, by label (`"alice"`).
    pub users: Vec<String>,
    /// Client machines, registered in this order (a user's first machine becomes primary).
    #[serde(default)]
    pub machines: Vec<MachineSpec>,
    /// Records in CRM at the start.
    #[serde(default)]
    pub records: Vec<RecordSpec>,
    /// Outlook items in the users' mailboxes at the start (a meeting copy Exchange delivered, an
    /// item the user made and tracked).
    #[serde(default)]
    pub items: Vec<ItemSpec>,
    /// The sync policies; anything left out is DOMAIN's default.
    #[serde(default)]
    pub policies: Option<PoliciesSpec>,
    /// The script.
    pub steps: Vec<Step>,
}

/// A client machine of one user, with its own sync cache and subscription.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// Its label, also its `MachineName` on the server.
    pub name: String,
    /// The user it belongs to.
    pub user: String,
    /// Page size of get sync data and of the mailbox's changes (default 1000).
    #[serde(default)]
    pub page_size: Option<usize>,
    /// Settled outcomes per cache transaction (default 1).
    #[serde(default)]
    pub commit_every: Option<usize>,
}

/// The synchronised entities, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntityType {
    Contact,
    Appointment,
    Email,
    Fax,
    Letter,
    PhoneCall,
    Task,
    ServiceAppointment,
    RecurringAppointmentMaster,
}

/// An activity's state (contacts are always open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusSpec {
    #[default]
    Open,
    Completed,
    Cancelled,
}

/// A record in CRM.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    pub label: String,
    #[serde(rename = "type")]
    pub entity: EntityType,
    /// The owning user.
    pub owner: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Users attending (calendar items only).
    #[serde(default)]
    pub attendees: Vec<String>,
    /// The meeting's GOID, by label (calendar items only; default: the record's label).
    #[serde(default)]
    pub goid: Option<String>,
    #[serde(default)]
    pub status: StatusSpec,
}

/// An item in a user's mailbox.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    pub label: String,
    /// Whose mailbox.
    pub user: String,
    #[serde(rename = "type")]
    pub entity: EntityType,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// The meeting's GOID, by label (calendar items only): a copy of a CRM meeting carries the
    /// meeting record's label.
    #[serde(default)]
    pub goid: Option<String>,
    #[serde(default)]
    pub status: StatusSpec,
    /// "Track in CRM" (default false: an item is not synchronised until the user tracks it).
    #[serde(default)]
    pub track: bool,
}

/// A side of the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SideSpec {
    Crm,
    Outlook,
}

/// One step of the script.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// A person edits a record in CRM or an item in Outlook.
    Edit(EditStep),
    /// A person deletes a record in CRM or an item in Outlook.
    Delete(TargetStep),
    /// A person creates a record in CRM or an item in Outlook.
    Create(CreateStep),
    /// The user marks an Outlook item "Track in CRM".
    Track(TargetStep),
    /// The user copies an Outlook item (the copy keeps the original's stamp, as Outlook's does).
    Copy(CopyStep),
    /// A CRM record gets another owner (it leaves the old owner's filter).
    Give(GiveStep),
    /// A user is removed from a CRM meeting's attendees (it leaves that user's filter).
    Uninvite(UninviteStep),
    /// A sync run on a machine: `"alice-pc1"`, or an object with options and faults.
    Sync(SyncArg),
    /// The machine becomes its user's primary client.
    SwitchPrimary(String),
    /// Desynchronise the machine: its subscription, queue and mapping go.
    Unlink(String),
    /// Link an unlinked machine again (a new subscription, an empty cache).
    Link(String),
    /// Reinstall the client on the machine: a new, empty cache and a new subscription, the old
    /// subscription left behind on the server (as reinstalls and new machines do).
    Reinstall(String),
    /// Expectations about the state now; each one that does not hold is a failed verdict.
    Check(CheckSpec),
}

/// Which record or item a step acts on: a CRM record (`record`) or an Outlook item (`item`), by
/// label. On the other side it is found through the link: the CRM record an item is stamped
/// with, or the item in `user`'s mailbox (default: the owner's) stamped with the record.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetStep {
    pub side: SideSpec,
    #[serde(default)]
    pub record: Option<String>,
    #[serde(default)]
    pub item: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EditStep {
    pub side: SideSpec,
    #[serde(default)]
    pub record: Option<String>,
    #[serde(default)]
    pub item: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Fields to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Fields to remove.
    #[serde(default)]
    pub unset: Vec<String>,
    /// A new activity state (CRM side only: marking it completed or cancelled).
    #[serde(default)]
    pub status: Option<StatusSpec>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateStep {
    pub side: SideSpec,
    /// The new record's or item's label.
    pub label: String,
    #[serde(rename = "type")]
    pub entity: EntityType,
    /// CRM: the owner. Outlook: whose mailbox.
    pub user: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// CRM meetings only.
    #[serde(default)]
    pub attendees: Vec<String>,
    #[serde(default)]
    pub goid: Option<String>,
    #[serde(default)]
    pub status: StatusSpec,
    /// Outlook only: "Track in CRM" (default false).
    #[serde(default)]
    pub track: bool,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyStep {
    /// The item to copy.
    pub item: String,
    /// The copy's label.
    pub label: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GiveStep {
    pub record: String,
    pub to: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UninviteStep {
    pub record: String,
    pub user: String,
}

/// A sync run: a machine name alone, or this object.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncSpec {
    pub machine: String,
    /// "Ignore all errors": failed changes move to IgnoredErrors.
    #[serde(default)]
    pub ignore_all_errors: bool,
    /// Overrides the machine's page size for this run.
    #[serde(default)]
    pub page_size: Option<usize>,
    /// Overrides the machine's commit group size for this run.
    #[serde(default)]
    pub commit_every: Option<usize>,
    /// The mass-delete guard confirmed by the user for this run.
    #[serde(default)]
    pub confirm_mass_delete: bool,
    /// Faults injected into this run.
    #[serde(default)]
    pub fail: Vec<FaultSpec>,
}

/// `"alice-pc1"` or `{"machine": "alice-pc1", ...}`.
#[derive(Debug, Clone)]
pub struct SyncArg(pub SyncSpec);

impl<'de> Deserialize<'de> for SyncArg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SyncSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a machine name or an object {\"machine\": ..., ...}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SyncSpec, E> {
                Ok(SyncSpec {
                    machine: v.to_owned(),
                    ignore_all_errors: false,
                    page_size: None,
                    commit_every: None,
                    confirm_mass_delete: false,
                    fail: Vec::new(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SyncSpec, A::Error> {
                SyncSpec::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_any(V).map(SyncArg)
    }
}

impl JsonSchema for SyncArg {
    fn schema_name() -> Cow<'static, str> {
        "SyncArg".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let spec = generator.subschema_for::<SyncSpec>();
        json_schema!({
            "description": "A sync run: the machine's name, or an object with options and faults.",
            "anyOf": [{ "type": "string" }, spec]
        })
    }
}

/// The durable steps of a run (`crmsync::engine::DurableStep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum DurableStepName {
    QueueServerPage,
    AcknowledgeServerPage,
    QueueMailboxPage,
    ApplyAction,
    FlushMailbox,
    SettleAction,
    CommitGroup,
    RestoreLinks,
    Reconcile,
}

/// The calls a client makes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServerCall {
    PrepareSync,
    GetSyncData,
    Acknowledge,
    CreateRecord,
    UpdateRecord,
    DeleteRecord,
    FetchRecord,
}

/// What the network loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lost {
    /// The request never reaches the server.
    Request,
    /// The server acts; its answer is lost.
    Answer,
}

/// A fault injected into one sync run, at a named point. `nth` counts from 1 within the run.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// The process is killed right after the `nth` durable step of this kind.
    Crash { after_step: DurableStepName, nth: u32 },
    /// The network loses the `nth` call of this kind (its request or its answer): the run stops.
    Network { call: ServerCall, lost: Lost, nth: u32 },
    /// A plug-in refuses writes to CRM: of this record (by label), of this call kind, the `nth`
    /// matching one or (without `nth`) every one.
    Reject {
        #[serde(default)]
        record: Option<String>,
        #[serde(default)]
        call: Option<ServerCall>,
        #[serde(default)]
        nth: Option<u32>,
    },
    /// An Outlook item is locked: the sync's writes to it fail. The item by label, or the item
    /// of the machine's user linked to the record.
    Lock {
        #[serde(default)]
        item: Option<String>,
        #[serde(default)]
        record: Option<String>,
    },
    /// The `nth` acknowledge is lost (the server never hears it; the run goes on).
    LoseAcknowledge { nth: u32 },
    /// The `nth` page of get sync data is the previous page delivered again.
    DuplicatePage { nth: u32 },
}

/// Expectations; each that does not hold becomes a failed verdict naming the step.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// What is being checked (shown with a failure).
    #[serde(default)]
    pub note: Option<String>,
    /// CRM records by label.
    #[serde(default)]
    pub records: BTreeMap<String, RecordExpect>,
    /// Outlook items.
    #[serde(default)]
    pub items: Vec<ItemExpect>,
    #[serde(default)]
    pub counts: Option<CountsExpect>,
    /// The safety invariants hold now: no two items with one stamp, no two linked items or CRM
    /// meetings with one GOID, every mapping a bijection.
    #[serde(default)]
    pub no_duplicates: bool,
    /// These machines' queues are empty.
    #[serde(default)]
    pub queue_empty: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordExpect {
    /// Whether the record exists (not deleted).
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub owner: Option<String>,
    /// Field values; `null` means the field is absent.
    #[serde(default)]
    pub fields: BTreeMap<String, Option<String>>,
}

/// An Outlook item: by label, or the item in `user`'s mailbox stamped with `record`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemExpect {
    #[serde(default)]
    pub item: Option<String>,
    #[serde(default)]
    pub record: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub exists: Option<bool>,
    /// Whether it is stamped with (linked to) a CRM record.
    #[serde(default)]
    pub linked: Option<bool>,
    /// Field values; `null` means the field is absent.
    #[serde(default)]
    pub fields: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CountsExpect {
    /// Live CRM records.
    #[serde(default)]
    pub records: Option<usize>,
    /// Items per user's mailbox.
    #[serde(default)]
    pub items: BTreeMap<String, usize>,
    /// Pairs per machine's mapping.
    #[serde(default)]
    pub mapping: BTreeMap<String, usize>,
    /// Entries per machine's queue.
    #[serde(default)]
    pub queue: BTreeMap<String, usize>,
    /// Ignored errors per machine.
    #[serde(default)]
    pub ignored: BTreeMap<String, usize>,
    /// Subscriptions on the server.
    #[serde(default)]
    pub subscriptions: Option<usize>,
    /// Groups of duplicate subscriptions (one user and machine) the orphans report lists.
    #[serde(default)]
    pub duplicate_subscriptions: Option<usize>,
}

/// The policies (DOMAIN section 5); anything left out is the default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoliciesSpec {
    #[serde(default)]
    pub field_conflict: Option<FieldConflictSpec>,
    #[serde(default)]
    pub update_vs_delete: Option<UpdateVsDeleteSpec>,
    /// A delete in CRM (or a record leaving the filter), per entity group.
    #[serde(default)]
    pub crm_delete: Option<DeleteMatrixSpec>,
    /// A delete in Outlook, per entity group.
    #[serde(default)]
    pub outlook_delete: Option<DeleteMatrixSpec>,
    /// Per entity and field, the direction (fields not named are two-way).
    #[serde(default)]
    pub field_directions: BTreeMap<EntityType, BTreeMap<String, DirectionSpec>>,
    #[serde(default)]
    pub mass_delete: Option<MassDeleteSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum FieldConflictSpec {
    CrmWins,
    OutlookWins,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum UpdateVsDeleteSpec {
    UpdateWins,
    DeleteWins,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum DeleteRuleSpec {
    Untrack,
    Delete,
    DeleteIfCurrent,
    DeleteIfOwnerOrOrganizer,
    DeleteIfCurrentAndOwnerOrOrganizer,
    DeleteUnlessOwner,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteMatrixSpec {
    #[serde(default)]
    pub contact: Option<DeleteRuleSpec>,
    #[serde(default)]
    pub appointment: Option<DeleteRuleSpec>,
    /// Tasks, phone calls, letters, faxes.
    #[serde(default)]
    pub activity: Option<DeleteRuleSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum DirectionSpec {
    TwoWay,
    CrmToOutlook,
    OutlookToCrm,
    None,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MassDeleteSpec {
    #[serde(default)]
    pub percent_max: Option<u8>,
    #[serde(default)]
    pub records_min: Option<usize>,
    #[serde(default)]
    pub confirmed: Option<bool>,
}

/// The JSON Schema of scenario files, pretty-printed with a final newline.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(Scenario);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema is JSON");
    text.push('\n');
    text
}
