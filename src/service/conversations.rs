//! Conversation presence (issue 27): who of a conversation's members is here, and how
//! many, as the viewer may see them. Counts and pages come from the same projected views,
//! so they agree for every viewer: a member hidden from the viewer (visibility, appear
//! offline) is counted and listed offline, a contacts-only member online only for viewers
//! who are among their contacts.

use super::Service;
use crate::auth::Identity;
use crate::core::{Presence, Status, UserId};
use crate::error::ApiError;

/// Members per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Most members per page.
pub const MAX_PAGE: usize = 1000;

/// Which members a page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// Shown with any status but `offline` (away and busy included).
    Online,
    Offline,
    All,
}

impl Listed {
    pub fn parse(s: &str) -> Option<Listed> {
        match s {
            "online" => Some(Listed::Online),
            "offline" => Some(Listed::Offline),
            "all" => Some(Listed::All),
            _ => None,
        }
    }

    fn takes(self, p: &Presence) -> bool {
        match self {
            Listed::Online => p.status != Status::Offline,
            Listed::Offline => p.status == Status::Offline,
            Listed::All => true,
        }
    }
}

/// One page of a conversation's presence.
#[derive(Debug, Clone)]
pub struct Page {
    /// Members in the conversation.
    pub members: usize,
    /// Members the viewer sees with any status but `offline`.
    pub online: usize,
    /// The page: members as the viewer may see them, ordered by user id.
    pub presences: Vec<Presence>,
    /// Where the next page starts (the last user id of this one), when there is one.
    pub next_cursor: Option<String>,
}

impl Service {
    /// `who` may see `conversation`'s presence: a member, or `presence:admin` (403
    /// otherwise; 404 for an admin asking for a conversation nobody set). Returns the
    /// members.
    pub fn may_see_conversation(&self, who: &Identity, conversation: &str) -> Result<crate::directory::Members, ApiError> {
        self.check_id("conversation id", conversation)?;
        let members = self.directory.members(conversation);
        let member = members.as_ref().is_some_and(|m| m.contains(who.sub.as_str()));
        if !member && !who.is_admin() {
            return Err(ApiError::Forbidden(format!(
                "only members of conversation {conversation} (or presence:admin) may see its presence"
            )));
        }
        members.ok_or_else(|| ApiError::NotFound(format!("conversation {conversation} has no members")))
    }

    /// The presence of `conversation`'s members for `who` (a member, or `presence:admin`;
    /// 403 otherwise, and for a conversation nobody set unless admin, 404 then): counts and
    /// the page of `limit` members after `cursor` that `listed` takes.
    pub async fn conversation_presence(
        &self,
        who: &Identity,
        conversation: &str,
        listed: Listed,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, ApiError> {
        self.check_id("conversation id", conversation)?;
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
        }
        if let Some(c) = cursor {
            self.check_id("cursor", c)?;
        }
        let members = self.may_see_conversation(who, conversation)?;
        let mut ids: Vec<UserId> = members.iter().cloned().collect();
        ids.sort();
        let seen = self.get_many_as(Some(who), &ids).await?;
        let online = seen.iter().filter(|p| Listed::Online.takes(p)).count();
        let mut presences = Vec::new();
        let mut next_cursor = None;
        for p in seen.into_iter().filter(|p| cursor.is_none_or(|c| p.user_id.as_str() > c)).filter(|p| listed.takes(p)) {
            if presences.len() == limit {
                next_cursor = presences.last().map(|p: &Presence| p.user_id.to_string());
                break;
            }
            presences.push(p);
        }
        Ok(Page { members: ids.len(), online, presences, next_cursor })
    }
}
