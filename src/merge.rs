//! The three-way field merge against the mapping's base (DOMAIN section 5, the update/update row
//! and per-field sync direction).
//!
//! For each field, with base `b` and the two sides' values `c` (CRM) and `o` (Outlook), a side
//! without a change counting as unchanged (`= b`):
//! - two-way: equal changes agree; a field changed on one side takes that side's value; a field
//!   changed on both takes `FieldConflictPolicy`;
//! - one-way: the source side's value, written to the other side only when the source side
//!   changed (an edit on the other side is overwritten by the next change from the source);
//! - not synchronised: left alone, and kept out of the base.
//!
//! Laws (property-tested): a side that did not change takes the other's values; equal changes
//! agree; every result value is the base's or one side's. Pure: no IO, no clock.

use serde::{Deserialize, Serialize};

use crate::entity::ObjectTypeCode;
use crate::fields::{FieldNames, FieldPatch, Fields, FieldsBuilder, FieldsError, Mask};
use crate::policy::{FieldConflictPolicy, FieldSyncDirection, Policies};

/// The result of a merge: the new agreed values and what to write to each side to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merged {
    /// The synchronised values both sides hold once the patches are written: the next base.
    pub fields: Fields,
    pub to_crm: FieldPatch,
    pub to_outlook: FieldPatch,
    /// Fields changed on both sides to different values, settled by `FieldConflictPolicy`.
    pub conflicts: FieldNames,
}

/// Merges the two sides' field values against `base`. `None` for a side means it has no change.
///
/// An error when the merged record would hold more fields or bytes than one record may (each
/// side within the limits, their union past them).
pub fn merge(
    base: &Fields,
    crm: Option<&Fields>,
    outlook: Option<&Fields>,
    object_type: ObjectTypeCode,
    policies: &Policies,
) -> Result<Merged, FieldsError> {
    let two_way = policies.field_directions.all_two_way(object_type);
    match (crm, outlook) {
        (Some(side), None) | (None, Some(side)) if two_way => {
            // One side changed and every field is two-way: its values are the result.
            let patch = FieldPatch::between(base, side);
            let (to_crm, to_outlook) =
                if crm.is_some() { (FieldPatch::default(), patch) } else { (patch, FieldPatch::default()) };
            return Ok(Merged { fields: side.clone(), to_crm, to_outlook, conflicts: FieldNames::default() });
        }
        _ => {}
    }
    if two_way {
        if let Some(merged) = merge_same_fields(base, crm, outlook, policies) {
            return merged;
        }
    }
    merge_fields(base, crm, outlook, object_type, policies)
}

/// The merge when every field is two-way and the three sets name the same fields (the usual
/// update of a held record): values are compared by position, and no field is added or cleared.
/// `None` when the sets name different fields. Gives what `merge_fields` gives for them.
fn merge_same_fields(
    base: &Fields,
    crm: Option<&Fields>,
    outlook: Option<&Fields>,
    policies: &Policies,
) -> Option<Result<Merged, FieldsError>> {
    let (crm, outlook) = (crm.unwrap_or(base), outlook.unwrap_or(base));
    let (b, c, o) = (base.view(), crm.view(), outlook.view());
    if b.schema() != c.schema() || b.schema() != o.schema() {
        return None;
    }
    // The result takes, per field, the CRM value or the Outlook one (`pick_outlook`).
    let mut pick_outlook: Mask = 0;
    let (mut set_crm, mut set_outlook): (Mask, Mask) = (0, 0);
    let mut conflicts: Mask = 0;
    let same = crate::fields::same_bytes;
    for i in 0..b.len() {
        let (bv, cv, ov) = (b.value_bytes(i), c.value_bytes(i), o.value_bytes(i));
        let take_outlook = if same(cv, ov) || same(ov, bv) {
            false
        } else if same(cv, bv) {
            true
        } else {
            conflicts |= 1 << i;
            policies.field_conflict == FieldConflictPolicy::OutlookWins
        };
        let bit: Mask = 1 << i;
        let r = if take_outlook {
            pick_outlook |= bit;
            ov
        } else {
            cv
        };
        if !same(r, cv) {
            set_crm |= bit;
        }
        if !same(r, ov) {
            set_outlook |= bit;
        }
    }
    let fields = if set_crm == 0 {
        crm.clone()
    } else if set_outlook == 0 {
        outlook.clone()
    } else {
        let value = |i: usize| if pick_outlook >> i & 1 == 1 { o.value(i) } else { c.value(i) };
        match FieldsBuilder::same_schema(&b, value) {
            Ok(fields) => fields,
            Err(error) => return Some(Err(error)),
        }
    };
    Some(Ok(Merged {
        to_crm: FieldPatch::new(&fields, set_crm, crm, 0),
        to_outlook: FieldPatch::new(&fields, set_outlook, outlook, 0),
        fields,
        conflicts: FieldNames::new(base, conflicts),
    }))
}

/// A value met in the walk: its position in its field set, and the value.
#[derive(Clone, Copy)]
struct Pick<'a> {
    index: usize,
    value: &'a str,
}

fn merge_fields(
    base: &Fields,
    crm: Option<&Fields>,
    outlook: Option<&Fields>,
    object_type: ObjectTypeCode,
    policies: &Policies,
) -> Result<Merged, FieldsError> {
    let crm_changed = crm.is_some();
    let outlook_changed = outlook.is_some();
    let crm = crm.unwrap_or(base);
    let outlook = outlook.unwrap_or(base);
    let lists = [base, crm, outlook];
    let mut result = FieldsBuilder::with_capacity(crm.len().max(outlook.len()));
    let mut result_len: u32 = 0;
    let (mut set_crm, mut set_outlook, mut clear_crm, mut clear_outlook): (Mask, Mask, Mask, Mask) =
        (0, 0, 0, 0);
    let mut conflicts: Vec<&str> = Vec::new();
    walk(&lists, |name, at| {
        fn value<'a>(p: Option<Pick<'a>>) -> Option<&'a str> {
            p.map(|p| p.value)
        }
        let [b, c, o] = at;
        let same = |x: Option<Pick>, y: Option<Pick>| value(x) == value(y);
        let direction = policies.field_directions.get(object_type, name);
        let (r, write_crm, write_outlook) = match direction {
            FieldSyncDirection::TwoWay => {
                let r = if same(c, o) || same(o, b) {
                    c
                } else if same(c, b) {
                    o
                } else {
                    conflicts.push(name);
                    match policies.field_conflict {
                        FieldConflictPolicy::CrmWins => c,
                        FieldConflictPolicy::OutlookWins => o,
                    }
                };
                (r, !same(r, c), !same(r, o))
            }
            FieldSyncDirection::CrmToOutlook => (c, false, crm_changed && !same(c, o)),
            FieldSyncDirection::OutlookToCrm => (o, outlook_changed && !same(o, c), false),
            FieldSyncDirection::None => return,
        };
        match value(r) {
            Some(v) => {
                result.push(name, v);
                // Past the field limit `build` refuses the result; no position is recorded.
                let bit: Mask = 1u128.checked_shl(result_len).unwrap_or(0);
                result_len += 1;
                if write_crm {
                    set_crm |= bit;
                }
                if write_outlook {
                    set_outlook |= bit;
                }
            }
            None => {
                // Cleared: name the field by its position in the side that still has it.
                if let (true, Some(p)) = (write_crm, c) {
                    clear_crm |= 1 << p.index;
                }
                if let (true, Some(p)) = (write_outlook, o) {
                    clear_outlook |= 1 << p.index;
                }
            }
        }
    });
    let fields = result.build()?;
    debug_assert_eq!(fields.len(), result_len as usize);
    Ok(Merged {
        to_crm: FieldPatch::new(&fields, set_crm, crm, clear_crm),
        to_outlook: FieldPatch::new(&fields, set_outlook, outlook, clear_outlook),
        fields,
        conflicts: FieldNames::of_sorted(&conflicts),
    })
}

/// Walks the union of the names of the three field sets in name order, handing each name with
/// its value and position in each set (`None` where absent).
fn walk<'a>(lists: &[&'a Fields; 3], mut visit: impl FnMut(&'a str, [Option<Pick<'a>>; 3])) {
    let mut iters = lists.map(|l| l.iter().enumerate().peekable());
    loop {
        let next = iters.iter_mut().filter_map(|it| it.peek().map(|&(_, (name, _))| name)).min();
        let Some(name) = next else { return };
        let picks: [Option<Pick<'a>>; 3] = std::array::from_fn(|l| {
            let it = &mut iters[l];
            match it.peek() {
                Some(&(index, (n, value))) if n == name => {
                    it.next();
                    Some(Pick { index, value })
                }
                _ => None,
            }
        });
        visit(name, picks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::FieldDirections;

    fn f(pairs: &[(&str, &str)]) -> Fields {
        Fields::try_from_pairs(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn field_changed_on_one_side_takes_that_side() {
        let base = f(&[("a", "1"), ("b", "1")]);
        let crm = f(&[("a", "2"), ("b", "1")]);
        let outlook = f(&[("a", "1"), ("b", "3")]);
        let m =
            merge(&base, Some(&crm), Some(&outlook), ObjectTypeCode::Contact, &Policies::default()).unwrap();
        assert_eq!(m.fields, f(&[("a", "2"), ("b", "3")]));
        assert_eq!(m.to_crm.iter().collect::<Vec<_>>(), [("b", Some("3"))]);
        assert_eq!(m.to_outlook.iter().collect::<Vec<_>>(), [("a", Some("2"))]);
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn conflict_follows_policy() {
        let base = f(&[("a", "1")]);
        let crm = f(&[("a", "2")]);
        let outlook = f(&[("a", "3")]);
        let mut p = Policies::default();
        let m = merge(&base, Some(&crm), Some(&outlook), ObjectTypeCode::Contact, &p).unwrap();
        assert_eq!(m.fields, crm);
        assert_eq!(m.conflicts, ["a"]);
        p.field_conflict = FieldConflictPolicy::OutlookWins;
        let m = merge(&base, Some(&crm), Some(&outlook), ObjectTypeCode::Contact, &p).unwrap();
        assert_eq!(m.fields, outlook);
        assert!(m.to_outlook.is_empty());
    }

    #[test]
    fn removed_field_is_cleared_on_the_other_side() {
        let base = f(&[("a", "1"), ("b", "1")]);
        let crm = f(&[("a", "1")]);
        let m = merge(&base, Some(&crm), None, ObjectTypeCode::Task, &Policies::default()).unwrap();
        assert_eq!(m.to_outlook.iter().collect::<Vec<_>>(), [("b", None)]);
        assert_eq!(m.fields, crm);
    }

    #[test]
    fn a_union_past_the_field_limit_is_an_error() {
        let side = |prefix: &str| {
            Fields::try_from_pairs((0..100).map(|i| (format!("{prefix}{i:03}"), "x".to_owned()))).unwrap()
        };
        let (crm, outlook) = (side("a"), side("b"));
        let merged = merge(
            &Fields::empty(),
            Some(&crm),
            Some(&outlook),
            ObjectTypeCode::Contact,
            &Policies::default(),
        );
        assert_eq!(merged, Err(FieldsError::TooMany(200)));
    }

    #[test]
    fn one_way_fields_flow_only_from_their_source() {
        let mut dirs = FieldDirections::default();
        let contact = dirs.0.entry(ObjectTypeCode::Contact).or_default();
        contact.insert("c2o".into(), FieldSyncDirection::CrmToOutlook);
        contact.insert("none".into(), FieldSyncDirection::None);
        let p = Policies { field_directions: dirs, ..Policies::default() };
        let base = f(&[("c2o", "1"), ("none", "1")]);
        // Outlook edits a CRM->Outlook field: nothing is written, the base keeps CRM's value.
        let outlook = f(&[("c2o", "9"), ("none", "9")]);
        let m = merge(&base, None, Some(&outlook), ObjectTypeCode::Contact, &p).unwrap();
        assert!(m.to_crm.is_empty() && m.to_outlook.is_empty());
        assert_eq!(m.fields, f(&[("c2o", "1")]));
        // The next CRM change overwrites the Outlook edit; the unsynchronised field stays apart.
        let crm = f(&[("c2o", "1"), ("none", "5")]);
        let m = merge(&base, Some(&crm), Some(&outlook), ObjectTypeCode::Contact, &p).unwrap();
        assert_eq!(m.to_outlook.iter().collect::<Vec<_>>(), [("c2o", Some("1"))]);
        assert!(m.to_crm.is_empty());
    }
}
