import Foundation
import WeftMeta
import WeftProto

/// `weft fsck`: metadata references and link counts, every chunk object's checksums, and
/// chunk objects nothing references.
struct Fsck {
    let hub: Hub
    /// Unreferenced objects younger than this may belong to a write in flight and are not reported.
    static let orphanGraceNs: Int64 = 60 * 1_000_000_000

    func run(repair: Bool) throws -> FsckReport {
        let check = try hub.meta.checkMetadata(repair: repair)
        var report = FsckReport(inodesChecked: check.inodes, problems: check.problems, repaired: check.repaired)
        // Objects a repair leaves (not checked, not written again), for `remaining` (SPEC.md §11).
        var objectsLeft: [String] = []
        var present: Set<SliceID> = []
        var orphans: [SliceID] = []
        var damaged: Set<SliceID> = []
        var vanished: Set<SliceID> = []
        let now = currentTimeNs()
        let agentsConnected = !hub.meta.agentNames.isEmpty
        try hub.chunks.forEach { id, _, modifiedNs in
            present.insert(id)
            if let expectedLength = check.referencedSlices[id] {
                report.chunksChecked += 1
                do {
                    let length = try hub.chunks.verify(id: id)
                    if length != Int(expectedLength) {
                        report.problems.append("chunk \(id) holds \(length) bytes, layouts expect \(expectedLength)")
                        damaged.insert(id)
                    }
                } catch let error as WeftError where error.errno == ENOENT {
                    vanished.insert(id)   // deleted since it was listed: checked again below
                } catch let error as WeftError where error.errno == EIO || error.errno == EBADMSG {
                    report.problems.append("chunk \(id) is damaged: \(error)")
                    damaged.insert(id)
                } catch {
                    // Not the object's fault (EMFILE, ENOMEM, ...): reported, never repaired.
                    report.problems.append("chunk \(id) could not be checked: \(error)")
                    objectsLeft.append(report.problems.last!)
                }
            } else if !check.garbage.contains(id) {
                if !agentsConnected || now - modifiedNs > Fsck.orphanGraceNs { orphans.append(id) }
            }
        }
        if !orphans.isEmpty {
            // The metadata was read before the objects were listed: leave out objects a commit
            // or a compaction took up since, and those still being written (a session's uploads,
            // compaction's object before its swap).
            let busy = hub.pendingUploads.held(among: orphans).union(hub.maintenance.compactingObjects())
            let referencedNow = try hub.meta.referenced(among: Set(orphans))
            orphans.removeAll { busy.contains($0) || referencedNow.contains($0) }
            for id in orphans { report.problems.append("chunk \(id) is not referenced by any file (orphan)") }
        }
        // Temporary files of co-located agents' writes that were never handed over (an agent
        // killed in between), past the same grace as orphans (SPEC.md §4, Co-located writes).
        var leftovers: [(id: SliceID, tag: UInt32)] = []
        try hub.chunks.forEachAgentTemporary { id, tag, bytes, modifiedNs in
            guard !agentsConnected || now - modifiedNs > Fsck.orphanGraceNs else { return }
            leftovers.append((id, tag))
            report.problems.append("chunk \(id): a co-located agent's temporary file (tag \(String(tag, radix: 16)), "
                                   + "\(bytes) bytes) that was never handed over")
        }
        var missing = Set(check.referencedSlices.keys).subtracting(present).union(vanished)
        if !missing.isEmpty {
            // Likewise: an object collected since the metadata was read is no longer referenced.
            let referencedNow = try hub.meta.referenced(among: missing)
            missing = missing.filter { referencedNow.contains($0) && !hub.chunks.exists(id: $0) }
        }
        for id in missing.sorted() { report.problems.append("chunk \(id) is referenced but missing") }
        // Objects whose bytes the metadata journal still carries (a failed sync left them to be
        // written again, or their key awaits a pass): written again from their keys, never
        // given up (SPEC.md §5, "A failed sync of journaled objects").
        let carried = try fromJournal(damaged.union(missing), repair: repair, into: &report, left: &objectsLeft)
        damaged.subtract(carried)
        missing.subtract(carried)
        if repair {
            for id in orphans { try hub.chunks.delete(id: id) }
            if !orphans.isEmpty { report.repaired.append("deleted \(orphans.count) orphan chunk object(s)") }
            let kept = leftovers.filter { !hub.chunks.removeTemporary(id: $0.id, tag: $0.tag) }
            for leftover in kept {
                objectsLeft.append("chunk \(leftover.id): a co-located agent's temporary file (tag "
                                   + "\(String(leftover.tag, radix: 16))) could not be removed")
            }
            if leftovers.count > kept.count {
                report.repaired.append("removed \(leftovers.count - kept.count) temporary file(s) co-located agents never handed over")
            }
            let lost = damaged.union(missing)
            if !lost.isEmpty {
                try hub.meta.dropSliceReferences(lost)
                try hub.meta.sync()
                for id in damaged { try hub.chunks.delete(id: id) }
                report.repaired.append("dropped references to \(lost.count) damaged or missing chunk object(s); "
                                       + "their ranges now read as zeros; the damaged objects were deleted")
            }
            try hub.meta.sync()
            // What remains is what a check finds now: a repair may leave problems of its own
            // (the entries of an unreachable directory it reclaimed) or fix one it could not
            // (a slice past its chunk whose object was dropped).
            report.remaining = try hub.meta.checkMetadata(repair: false).problems + objectsLeft
        } else {
            report.remaining = report.problems
        }
        return report
    }

    /// Of the damaged or missing objects `lost`, those the journal carries. With `repair` each
    /// is written again from its key (`Hub.rewriteCarried`, as the hub's pass would after a
    /// failed sync); one that cannot be is reported, and added to `left`, and waits with its key.
    private func fromJournal(_ lost: Set<SliceID>, repair: Bool, into report: inout FsckReport,
                             left: inout [String]) throws -> Set<SliceID> {
        guard !lost.isEmpty else { return [] }
        let carried = Set(try hub.meta.journaledObjects().filter { lost.contains($0.id) && !$0.isGarbage }.map(\.id))
        guard repair else {
            for id in carried.sorted() {
                report.problems.append("chunk \(id): the metadata journal carries its bytes; --repair writes it again from there")
            }
            return carried
        }
        let (rewritten, failed) = try hub.rewriteCarried(carried)
        for (id, error) in failed {
            report.problems.append("chunk \(id) could not be written again from the metadata journal, which keeps its bytes: \(error)")
            left.append(report.problems.last!)
        }
        if !rewritten.isEmpty {
            report.repaired.append("wrote \(rewritten.count) damaged or missing chunk object(s) again from the metadata journal")
        }
        return carried
    }
}
