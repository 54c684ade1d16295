import Foundation
import Logging
import WeftChunks
import WeftCluster
import WeftHub
import WeftProto

/// The chunk stores of one volume at this hub (SPEC.md §12.4): `chunks/` (objects written
/// through this hub; for a home volume, its `Hub`'s store) and `cache/` (read-through copies).
final class VolumeData: @unchecked Sendable {
    let id: UInt16
    let info: VolumeInfo
    let chunks: ChunkStore
    let cache: ChunkStore
    /// Objects each data session wrote and has not reported committed (SPEC.md §12.5).
    private let pendingUploads = PendingUploads()

    init(id: UInt16, info: VolumeInfo, chunks: ChunkStore, cache: ChunkStore) {
        self.id = id; self.info = info; self.chunks = chunks; self.cache = cache
    }

    func uploaded(_ id: SliceID, session: SessionID) {
        pendingUploads.add(id, session: session)
    }

    func committed(_ ids: [SliceID], session: SessionID) {
        pendingUploads.take(ids, session: session)
    }

    /// Deletes those of `ids` that `session` wrote and has not reported committed.
    func discard(_ ids: [SliceID], session: SessionID) throws {
        try chunks.delete(ids: pendingUploads.take(ids, session: session))
    }

    func endSession(_ session: SessionID) -> Set<SliceID> {
        pendingUploads.end(session)
    }
}

/// A data-only session: chunk calls of an agent whose volume is homed at another hub.
struct DataSession {
    var volume: VolumeData
    var agentName: String
}

extension FabricHub {
    /// The chunk stores of volume `record` at this hub, opened on first use.
    func volumeData(_ record: VolumeRecord) throws -> VolumeData {
        if let open = lock.withLock({ dataVolumes[record.id] }) { return open }
        guard let compression = Compression(name: record.compression) else {
            throw WeftError(EINVAL, "volume '\(record.name)' has unknown compression '\(record.compression)'")
        }
        let home = lock.withLock { volumes[record.id] }
        let path = volumeDirectory(record.id)
        let chunks = try home?.chunks ?? ChunkStore(directory: path + "/chunks", compression: compression, logger: logger,
                                                     directReads: false)
        if home == nil {
            chunks.setReserve(reserveBytes ?? ChunkStore.defaultReserveBytes(directory: path + "/chunks"))
        }
        let cache = try ChunkStore(directory: path + "/cache", compression: compression, logger: logger, directIO: false)
        let info = home?.meta.volume ?? VolumeInfo(formatVersion: 1, uuid: [UInt8](repeating: 0, count: 16),
                                                   chunkSizeBytes: record.chunkSizeBytes, compression: compression,
                                                   createdNs: record.createdNs)
        let data = VolumeData(id: record.id, info: info, chunks: chunks, cache: cache)
        let (kept, fresh) = lock.withLock { () -> (VolumeData, Bool) in
            if let open = dataVolumes[record.id] { return (open, false) }
            dataVolumes[record.id] = data
            return (data, true)
        }
        if fresh { try readThrough.adopt(cache) }
        return kept
    }

    /// The chunk stores of the volume an object id belongs to, if this hub has any.
    func volumeData(ofObject id: SliceID) throws -> VolumeData? {
        let volumeID = UInt16(truncatingIfNeeded: id >> 48)
        if let open = lock.withLock({ dataVolumes[volumeID] }) { return open }
        guard let record = member.map.volume(id: volumeID) else { return nil }
        let isHome = lock.withLock { volumes[volumeID] != nil }
        guard isHome || FileManager.default.fileExists(atPath: volumeDirectory(volumeID) + "/chunks") else { return nil }
        return try volumeData(record)
    }

    // MARK: HubAPI — data across hubs

    public func openDataSession(agentName: String, volume name: String) throws -> (SessionID, VolumeInfo) {
        try waitStarted()
        guard let record = member.map.volumes[name] else { throw WeftError(ENOENT, "no volume named '\(name)' in the cluster") }
        guard record.home != member.hubName else {
            throw WeftError(EINVAL, "volume '\(name)' is homed at this hub: open a volume session")
        }
        let data = try volumeData(record)
        let id: SessionID = lock.withLock {
            let id = nextSession
            nextSession += 1
            dataSessions[id] = DataSession(volume: data, agentName: agentName)
            return id
        }
        logger.info("data session opened", metadata: ["volume": "\(name)", "agent": "\(agentName)", "session": "\(id)"])
        return (id, data.info)
    }

    func dataSession(_ context: RequestContext) -> DataSession? {
        lock.withLock { dataSessions[context.session] }
    }

    func closeDataSession(_ session: SessionID) -> Bool {
        guard let ended = lock.withLock({ dataSessions.removeValue(forKey: session) }) else { return false }
        let unconfirmed = ended.volume.endSession(session)
        ended.volume.chunks.forgetSession(session)
        if !unconfirmed.isEmpty {
            // They may be committed (the agent died between the commit and its report): only
            // the home knows. Kept, not deleted (SPEC.md §12.5, limitations).
            logger.warning("data session ended with uploads not reported committed; kept",
                           metadata: ["session": "\(session)", "volume": "\(ended.volume.id)",
                                      "objects": "\(unconfirmed.count)"])
        }
        return true
    }

    func writeData(_ session: DataSession, _ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        try storeData(session, context, id: id, rawLength: bytes.count) { try $0.write(id: id, data: bytes) }
    }

    /// `writeData` of an object sent as its compressed image (SPEC.md §4, Compressed uploads).
    func writeData(_ session: DataSession, _ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        guard session.volume.info.compression == .zstd else {
            throw WeftError(EINVAL, "this volume stores objects uncompressed; send writeSlice")
        }
        // The raw length is checked after the image (a damaged length field is EBADMSG).
        try storeData(session, context, id: id, rawLength: 0) {
            try $0.writeImage(id: id, image: image, maxRawLength: Int(session.volume.info.chunkSizeBytes))
        }
    }

    private func storeData(_ session: DataSession, _ context: RequestContext, id: SliceID, rawLength: Int,
                           _ write: (ChunkStore) throws -> Void) throws {
        guard id >> 48 == UInt64(session.volume.id), id & 0xFFFF_FFFF_FFFF != 0 else {
            throw WeftError(EINVAL, "slice id \(id) is not of volume \(session.volume.id)")
        }
        guard rawLength <= Int(session.volume.info.chunkSizeBytes) else {
            throw WeftError(EINVAL, "slice larger than a chunk")
        }
        try write(session.volume.chunks)
        // The data session's sync is what the agent's commit at the home relies on: a pass that
        // fails on this object tells that sync (SPEC.md §3.2, "Objects lost to a failed pass").
        guard session.volume.chunks.assign([id], inode: 0, session: context.session).isEmpty else {
            // A pass took it and failed between the write and this line: the agent writes it again.
            throw WeftError(EIO, "chunk object \(id) could not be made durable (a sync of it failed)")
        }
        session.volume.uploaded(id, session: context.session)
    }

    /// Reads object `id` of `volume` from `chunks/` or `cache/`, fetching it into `cache/` from
    /// `holders` (then the home) when neither has it.
    func readThrough(_ volume: VolumeData, id: SliceID, offset: UInt32, holders: [UInt16],
                     into destination: UnsafeMutableRawBufferPointer) throws {
        guard destination.count <= Limits.transferMaxBytes else { throw WeftError.invalid }
        do {
            try volume.chunks.read(id: id, offset: Int(offset), into: destination)
            return
        } catch let error as WeftError where error.errno == ENOENT {}
        for attempt in 1...2 {
            do {
                try volume.cache.read(id: id, offset: Int(offset), into: destination)
                readThrough.touched(id)
                return
            } catch let error as WeftError where error.errno == ENOENT {
                // Not cached (or evicted meanwhile): fetch below.
            } catch let error as WeftError where attempt == 1 && ![EINVAL, EMFILE, ENFILE, ENOMEM].contains(error.errno) {
                // A cached copy damaged on this hub's disk (EIO), or one it cannot open or read
                // (EACCES, EISDIR, ...): drop it and fetch a good one. A bad range or a shortage
                // of descriptors or memory is not the copy's fault.
                try? volume.cache.delete(id: id)
                readThrough.forget(id)
            }
            guard attempt == 1 else { break }
            try readThrough.fetch(id, ReadThrough.Target(volumeID: volume.id, cache: volume.cache,
                                                         sources: sources(volume.id, holders: holders)))
        }
        throw WeftError(EIO, "chunk \(hex(id)) was evicted from the cache as it was fetched")
    }

    /// The hubs to fetch an object of volume `volumeID` from: its holders, then its home.
    func sources(_ volumeID: UInt16, holders: [UInt16]) -> [(hub: UInt16, address: String?)] {
        let map = member.map
        let me = member.hubID
        var seen = Set<UInt16>()
        var result: [(hub: UInt16, address: String?)] = []
        let homeName = map.volume(id: volumeID)?.home
        let homeID = homeName.flatMap { map.hubIDs[$0] } ?? 0
        for holder in holders.prefix(Limits.holdersMax) + [0] {
            let hub = holder == 0 ? homeID : holder
            guard hub != 0, hub != me, seen.insert(hub).inserted else { continue }
            let name = hub == homeID ? homeName : map.hubName(id: hub)
            result.append((hub, name.flatMap { map.address(of: $0, from: member.hubName) }))
        }
        return result
    }

    public func fetchObject(id: SliceID, offset: UInt32, length: UInt32) throws -> (fileBytes: UInt32, bytes: [UInt8]) {
        guard length <= UInt32(Limits.fetchPieceMaxBytes) else {
            throw WeftError(EINVAL, "fetchObject of \(length) bytes, over \(Limits.fetchPieceMaxBytes)")
        }
        guard let volume = try volumeData(ofObject: id) else { throw WeftError(ENOENT, "chunk \(hex(id)) missing") }
        let (fileBytes, bytes) = try volume.chunks.readObjectFile(id: id, offset: Int(offset), length: Int(length))
        return (UInt32(fileBytes), bytes)
    }

    // MARK: Garbage at holders (SPEC.md §12.5)

    public func deleteObjects(ids: [SliceID]) throws {
        for id in ids {
            try readThrough.drop(id)
            guard let volume = try volumeData(ofObject: id) else { continue }
            // The home deletes its own objects itself; only a holder's copies go here.
            if lock.withLock({ volumes[volume.id] == nil }) { try volume.chunks.delete(id: id) }
        }
        if !ids.isEmpty {
            logger.debug("deleted chunk objects that their home dropped", metadata: ["count": "\(ids.count)"])
        }
    }

    /// Called by a home volume's garbage collection for objects held by hub `holder`: deletes
    /// them there (and this hub's cached copies). Throws while `holder` cannot be reached.
    func deleteAtHolder(_ holder: UInt16, ids: [SliceID]) throws {
        for id in ids { try readThrough.drop(id) }
        if holder == member.hubID {
            // Recorded with this hub's own id: the objects are in this (home) hub's chunk store.
            for id in ids { try volumeData(ofObject: id)?.chunks.delete(id: id) }
            return
        }
        let map = member.map
        // Unknown or down: kept as garbage and tried again later (a leak at worst, never a loss).
        guard let name = map.hubName(id: holder) else {
            throw WeftError(EHOSTUNREACH, "hub \(holder) is not in the cluster map")
        }
        guard let address = map.address(of: name, from: member.hubName) else {
            throw WeftError(EHOSTUNREACH, "hub \(name) has no address in the cluster map")
        }
        try readThrough.peer(address).deleteObjects(ids: ids)
    }
}
