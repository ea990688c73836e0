//! Sending a log file from an offset to its end, synchronously: a serial log after its
//! phase, and the output a detached job left undelivered ([`PendingOutput`]), fragment by
//! fragment as the server accepts them.

use super::read::{masked_piece, Piece};
use super::{PendingOutput, PendingPhase, MIN_CUT};
use crate::mask::Masker;
use crate::phase::Phase;
use crate::server::client::Core;
use crate::server::fragment::FragmentBody;
use crate::server::settings::MAX_FRAGMENT_TEXT;
use crate::server::{LogType, ServerError, ServerErrorKind};
use std::path::Path;

/// Sends `path` from `*offset` to its end as fragments of `log_type`, synchronously, each
/// retried as the policy allows; `*offset` and `*number` follow what the server accepted.
/// A refused fragment is logged and skipped (its number is reused). A serial log is masked
/// fragment by fragment with the secrets of `phase` from the job file beside it (see
/// [`serial_masker`], [`masked_piece`]); a phase log was masked as it was written.
pub(in crate::server) fn send_file(
    core: &Core,
    job_id: &str,
    log_type: LogType,
    phase: Phase,
    path: &Path,
    offset: &mut u64,
    number: &mut u64,
) -> Result<(), ServerError> {
    let masker = match (log_type, path.parent()) {
        (LogType::Serial, Some(rundir)) => serial_masker(rundir, phase),
        _ => Masker::default(),
    };
    let what = format!(
        "sending the {} log of {phase} of job {job_id}",
        log_type.name()
    );
    let len = std::fs::metadata(path)
        .map_err(|e| {
            ServerError::new(
                ServerErrorKind::Local,
                what.as_str(),
                format!("cannot read {}: {e}", path.display()),
            )
        })?
        .len();
    let mut refused = None;
    let mut buf = Vec::new();
    while *offset < len {
        // At most the fragment size, less when the escaped text would be too long.
        let mut limit = core.settings.fragment_size;
        let (body, consumed) = loop {
            let (text, consumed) = match masked_piece(path, *offset, len, limit, &masker) {
                Piece::Text { text, consumed } => (text, consumed),
                Piece::Incomplete => return refused.map_or(Ok(()), Err),
                Piece::Unreadable(why) => {
                    return Err(ServerError::new(ServerErrorKind::Local, what.as_str(), why))
                }
            };
            let mut body = FragmentBody::new(std::mem::take(&mut buf));
            body.push_bytes(text.as_bytes());
            if body.text_len() > MAX_FRAGMENT_TEXT && limit > MIN_CUT {
                buf = body.into_buffer();
                limit /= 2;
                continue;
            }
            break (body, consumed);
        };
        let req = core.fragment_request(job_id, log_type, *number, phase, body);
        match core.call(&req) {
            Ok(reply) if (200..300).contains(&reply.status) => {
                reply.discard();
                *offset += consumed;
                *number += 1;
            }
            Ok(reply) if core.is_auth_refusal(&reply) => {
                return Err(core.answer_error(&req, &reply));
            }
            Ok(reply) => {
                let error = core.answer_error(&req, &reply);
                log::error!(
                    "{} fragment {} of job {job_id} ({consumed} bytes of {}) was refused and \
                     is skipped: {error}",
                    log_type.name(),
                    *number,
                    path.display()
                );
                *offset += consumed;
                refused = Some(error);
            }
            Err(e) => return Err(e),
        }
        buf = req.into_buffer().unwrap_or_default();
    }
    refused.map_or(Ok(()), Err)
}

/// Sends what [`Streamer::detach`](super::Streamer::detach) left, from the files in
/// `rundir`; `pending` follows what the server accepted, so it can be stored again after
/// an error.
pub(in crate::server) fn send_pending(
    core: &Core,
    job_id: &str,
    rundir: &Path,
    pending: &mut PendingOutput,
) -> Result<(), ServerError> {
    send_queue(
        core,
        job_id,
        rundir,
        LogType::Output,
        &mut pending.phases,
        &mut pending.next_fragment,
    )?;
    send_queue(
        core,
        job_id,
        rundir,
        LogType::Serial,
        &mut pending.serial,
        &mut pending.next_serial_fragment,
    )
}

/// Sends the rest of each file of `queue` as `log_type` fragments numbered from `number`,
/// updating the queue and the number as the server accepts them.
fn send_queue(
    core: &Core,
    job_id: &str,
    rundir: &Path,
    log_type: LogType,
    queue: &mut Vec<PendingPhase>,
    number: &mut u64,
) -> Result<(), ServerError> {
    while let Some(first) = queue.first_mut() {
        let plain_name = !first.log_file.is_empty()
            && Path::new(&first.log_file).file_name() == Some(first.log_file.as_ref());
        let phase = Phase::from_name(&first.phase);
        let (Some(phase), true) = (phase, plain_name) else {
            log::error!(
                "pending {} log of job {job_id} names phase {:?} and file {:?}, which is not a \
                 phase and a file name; it is dropped",
                log_type.name(),
                first.phase,
                first.log_file
            );
            queue.remove(0);
            continue;
        };
        let path = rundir.join(&first.log_file);
        let mut offset = first.sent;
        let result = send_file(core, job_id, log_type, phase, &path, &mut offset, number);
        first.sent = offset;
        match result {
            Ok(()) => {}
            Err(e) if e.kind == ServerErrorKind::Rejected => {}
            Err(e) if e.kind == ServerErrorKind::Local => {
                log::error!(
                    "pending {} log of job {job_id} cannot be sent and is dropped: {e}",
                    log_type.name()
                );
            }
            Err(e) => return Err(e),
        }
        queue.remove(0);
    }
    Ok(())
}

/// The masker for the serial log of `phase` in `rundir`: the phase's secrets, read from
/// the job document the run directory holds (`testflinger.json`, exactly as the server
/// sent it), so that a serial log sent from the spool or after a restart is masked like
/// one sent at the end of its phase. A document that cannot be read masks nothing (its
/// job never ran a phase).
fn serial_masker(rundir: &Path, phase: Phase) -> Masker {
    let document = std::fs::read(rundir.join(crate::outcome::JOB_FILE)).unwrap_or_default();
    Masker::new(crate::job::secret_values(&document, phase))
}
