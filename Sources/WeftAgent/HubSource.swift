import Foundation
import Logging
import WeftCluster
import WeftHub
import WeftMeta
import WeftNet
import WeftProto
import WeftVFS

/// Where a command finds its hub: a hub directory (embedded) or a running weftd.
public enum HubSource: CustomStringConvertible {
    case directory(String)
    /// A weftd. `volume` is nil for `weft://HOST:PORT` (a single hub's volume), the volume name
    /// for `weft://HOST:PORT/NAME`, and "" for `weft://HOST:PORT/` (the global root of a cluster).
    case remote(HubAddress, volume: String?)

    public static func parse(_ text: String) throws -> HubSource {
        if text.hasPrefix("weft://") {
            let rest = text.dropFirst("weft://".count)
            guard let slash = rest.firstIndex(of: "/") else { return .remote(try HubAddress.parse(text), volume: nil) }
            let volume = String(rest[rest.index(after: slash)...])
            if volume.contains("/") { throw WeftError(EINVAL, "bad source '\(text)': a volume name has no '/'") }
            return .remote(try HubAddress.parse("weft://" + rest[..<slash]), volume: volume)
        }
        if text.contains("://") { throw WeftError(EINVAL, "unknown source '\(text)': use a hub directory or weft://HOST:PORT") }
        let path = URL(fileURLWithPath: text).standardizedFileURL.path
        return .directory(path)
    }

    public var description: String {
        switch self {
        case .directory(let path): return path
        case let .remote(address, volume): return "\(address)" + (volume.map { "/" + $0 } ?? "")
        }
    }
}

/// A hub reached for one command, and how to let go of it.
public struct OpenedHub {
    public let api: HubAPI
    /// The in-process hub, when this process owns the directory.
    public let local: Hub?
    let remote: RemoteHub?
    /// Further connections the hub uses (a volume split across hubs).
    var connections: [RemoteHub] = []

    public func close() {
        if let local { try? local.close() }
        remote?.close()
        for connection in connections { connection.close() }
    }
}

public enum HubOpener {
    /// The hub to send `volume`'s calls to, reached through the hub at `address`: that hub
    /// itself when it is the volume's home (or `volume` is "", a single hub), else the home,
    /// at the address the cluster map gives for the region of the hub at `address`.
    /// `compressUploads`: on a zstd volume, this process compresses what it uploads (SPEC.md §4,
    /// "Compressed uploads"); otherwise the hub does.
    public static func openVolume(address: HubAddress, volume: String, requestTimeoutMs: Int = defaultRequestTimeoutMs,
                                  compressUploads: Bool = true, logger: Logger) throws -> RemoteHub {
        let entry = RemoteHub(address: address, connectTimeoutMs: connectTimeoutMs, requestTimeoutMs: requestTimeoutMs,
                              compressUploads: compressUploads, logger: logger)
        guard !volume.isEmpty else { return entry }
        do {
            let map = try ClusterMap.decode(try entry.clusterMap(), from: address.displayName)
            guard let home = map.volumes[volume]?.home else {
                throw WeftError(ENOENT, "no volume named '\(volume)' in the cluster of \(address.displayName)")
            }
            let region = map.answeredBy ?? ""
            if home == region { return entry }
            guard let homeAddress = map.address(of: home, from: region) else {
                throw WeftError(EIO, "volume '\(volume)': its home hub '\(home)' is down")
            }
            entry.close()
            return RemoteHub(address: try HubAddress.parse("weft://" + homeAddress), connectTimeoutMs: connectTimeoutMs,
                             requestTimeoutMs: requestTimeoutMs, compressUploads: compressUploads, logger: logger)
        } catch {
            entry.close()
            throw error
        }
    }

    /// The `HubAPI` of `volume` for an agent that mounts through the hub at `address`, and the
    /// connections it uses (to close at unmount). When that hub is the volume's home (or a
    /// single hub), it is that hub. Otherwise (SPEC.md §12.5) metadata goes to the home and chunk
    /// data to the hub at `address`, which stores what the agent writes and caches what it reads.
    public static func openVolumeAPI(address: HubAddress, volume: String, requestTimeoutMs: Int = defaultRequestTimeoutMs,
                                     compressUploads: Bool = true, logger: Logger) throws -> (api: HubAPI, connections: [RemoteHub]) {
        let home = try openVolume(address: address, volume: volume, requestTimeoutMs: requestTimeoutMs,
                                  compressUploads: compressUploads, logger: logger)
        guard !volume.isEmpty, home.address != address else { return (home, [home]) }
        let data = RemoteHub(address: address, connectTimeoutMs: connectTimeoutMs, requestTimeoutMs: requestTimeoutMs,
                             compressUploads: compressUploads, logger: logger)
        do {
            let map = try ClusterMap.decode(try data.clusterMap(), from: address.displayName)
            guard let region = map.answeredBy, let id = map.hubIDs[region], id != 0 else {
                throw WeftError(EIO, "hub \(address.displayName) does not say its cluster id")
            }
            return (SplitVolumeHub(home: home, data: data, dataHubID: id), [home, data])
        } catch {
            home.close()
            data.close()
            throw error
        }
    }

    /// One line at unmount: what this agent compressed of its uploads (SPEC.md §4, "Compressed
    /// uploads"; `weft mount --upload-compression`).
    static func logCompressedUploads(_ connections: [RemoteHub], logger: Logger) {
        guard !connections.isEmpty else { return }   // an embedded hub compresses itself
        let sent = connections.map(\.compressedUploads)
        let objects = sent.reduce(0) { $0 + $1.objects }
        let raw = sent.reduce(0) { $0 + $1.rawBytes }
        let images = sent.reduce(0) { $0 + $1.imageBytes }
        let mode = connections.contains { $0.compressUploads } ? "agent" : "hub"
        logger.info("uploads compressed by this agent: \(objects) object(s), \(raw) bytes sent as \(images) (upload compression: \(mode))")
    }

    /// At unmount, when co-located reads or writes were on: how many reads came from the hub's
    /// store and how many went to the hub after trying it, and the same for uploads (SPEC.md
    /// §4, Co-located reads and writes). One line each, none for what was not tried.
    static func logLocalStore(_ connections: [RemoteHub], logger: Logger) {
        let served = connections.reduce(0) { $0 + $1.localReadCount }
        let fellBack = connections.reduce(0) { $0 + $1.localReadFallbacks }
        if connections.contains(where: \.localReads), served + fellBack > 0 {
            logger.info("co-located reads: \(served) from the hub's store, \(fellBack) sent to the hub after trying it")
        }
        let adopted = connections.reduce(0) { $0 + $1.localWriteCount }
        let sent = connections.reduce(0) { $0 + $1.localWriteFallbacks }
        if connections.contains(where: \.localWrites), adopted + sent > 0 {
            logger.info("co-located writes: \(adopted) object(s) written into the hub's store, \(sent) sent to the hub after trying it")
        }
    }

    /// Longest wait for a hub that does not answer.
    public static let connectTimeoutMs = 5_000
    /// Default bound of one call to a remote hub (`weft mount --hub-timeout`).
    public static let defaultRequestTimeoutMs = 10_000

    /// Opens `source` for an administrative command: a running process that serves a hub
    /// directory is reached through its socket; otherwise the directory is opened in-process.
    public static func open(_ source: HubSource, durability: DurabilityMode = .strict, reserveBytes: UInt64? = nil,
                            recover: Bool, logger: Logger) throws -> OpenedHub {
        switch source {
        case .remote(let address, _):
            let remote = RemoteHub(address: address, connectTimeoutMs: connectTimeoutMs, logger: logger)
            return OpenedHub(api: remote, local: nil, remote: remote)
        case .directory(let path):
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw WeftError(ENOENT, "hub directory \(path) does not exist")
            }
            if EmbeddedSocket.isServed(path) {
                let remote = RemoteHub(address: .unix(path: EmbeddedSocket.path(path)), connectTimeoutMs: connectTimeoutMs,
                                       logger: logger)
                return OpenedHub(api: remote, local: nil, remote: remote)
            }
            let hub = try Hub(directory: path, durability: durability, reserveBytes: reserveBytes, logger: logger)
            if recover { try hub.recover() }
            return OpenedHub(api: hub, local: hub, remote: nil)
        }
    }
}
