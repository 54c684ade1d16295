import ArgumentParser
import Foundation
import WeftAgent
import WeftCluster
import WeftNet
import WeftProto

/// Reaches a cluster hub for an admin command; SOURCE is any hub's weft://HOST:PORT.
func withClusterHub<T>(_ source: String, _ body: (RemoteHub) throws -> T) throws -> T {
    guard case let .remote(address, _) = try HubSource.parse(source) else {
        throw ValidationError("SOURCE must be a cluster hub's weft://HOST:PORT, not a directory")
    }
    let hub = RemoteHub(address: address, connectTimeoutMs: HubOpener.connectTimeoutMs, requestTimeoutMs: 30_000,
                        logger: WeftLogging.logger("weft", level: .warning))
    defer { hub.close() }
    return try body(hub)
}

func fetchMap(_ hub: RemoteHub) throws -> ClusterMap {
    try ClusterMap.decode(try hub.clusterMap(), from: hub.address.displayName)
}

/// One "key<TAB>value" line per field, in key order; lists and maps as compact JSON.
func printFields(_ object: [String: Any]) throws {
    for key in object.keys.sorted() {
        let value = object[key]!
        if value is [Any] || value is [String: Any] {
            let data = try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys])
            print("\(key)\t\(String(decoding: data, as: UTF8.self))")
        } else {
            print("\(key)\t\(value)")
        }
    }
}

func printJSON(_ object: Any) throws {
    let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}

func volumeObject(_ volume: VolumeRecord, _ map: ClusterMap) -> [String: Any] {
    ["name": volume.name, "id": Int(volume.id), "home": volume.home, "epoch": volume.epoch,
     "chunkSizeBytes": Int(volume.chunkSizeBytes), "compression": volume.compression, "createdNs": volume.createdNs,
     "homeLive": map.hubs[volume.home] != nil,
     "served": map.hubs[volume.home]?.serving?.contains(volume.name) ?? false]
}

func hubObject(_ name: String, _ map: ClusterMap) -> [String: Any] {
    let live = map.hubs[name]
    var object: [String: Any] = ["name": name, "id": Int(map.hubIDs[name] ?? live?.id ?? 0), "live": live != nil,
                                 "homeOf": map.volumes.values.filter { $0.home == name }.map(\.name).sorted()]
    if let live {
        object["address"] = live.address
        object["startedNs"] = live.startedNs
        object["serving"] = live.serving ?? []
    }
    if let routes = map.routes[name] { object["routes"] = routes }
    return object
}

struct VolumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create and show the volumes of a cluster.",
        discussion: "SOURCE is any hub of the cluster: weft://HOST:PORT.",
        subcommands: [VolumeCreate.self, VolumeList.self, VolumeShow.self])
}

struct VolumeCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create volume NAME homed at hub HUB; it appears in every hub's global root.")

    @Argument(help: "Any hub of the cluster, weft://HOST:PORT.") var source: String
    @Argument(help: "Volume name (a path component).") var name: String
    @Option(help: "Hub that will be the volume's metadata authority.") var home: String
    @Option(help: "Chunk size in bytes: a multiple of 65536 from 65536 to 67108864.") var chunkSize: Int = 4 << 20
    @Option(help: "Chunk compression: zstd or none.") var compression: String = "none"
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        guard let codec = Compression(name: compression) else {
            throw ValidationError("--compression must be zstd or none, not '\(compression)'")
        }
        guard chunkSize > 0, chunkSize <= Int(UInt32.max) else { throw ValidationError("--chunk-size out of range") }
        try withClusterHub(source) { hub in
            let data = try hub.createVolume(name: name, home: home, chunkSizeBytes: UInt32(chunkSize), compression: codec)
            let record = try JSONDecoder().decode(VolumeRecord.self, from: Data(data))
            let map = try fetchMap(hub)
            if json {
                try printJSON(volumeObject(record, map))
            } else {
                print("created volume \(record.name) (id \(record.id)) homed at \(record.home)")
            }
        }
    }
}

struct VolumeList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the volumes of the cluster.")

    @Argument(help: "Any hub of the cluster, weft://HOST:PORT.") var source: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try withClusterHub(source) { hub in
            let map = try fetchMap(hub)
            let volumes = map.volumes.values.sorted { $0.name < $1.name }
            if json {
                try printJSON(["volumes": volumes.map { volumeObject($0, map) }, "revision": map.revision])
            } else {
                for volume in volumes {
                    print("\(volume.name)\tid \(volume.id)\thome \(volume.home)\(map.hubs[volume.home] == nil ? " (down)" : "")")
                }
            }
        }
    }
}

struct VolumeShow: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show one volume.")

    @Argument(help: "Any hub of the cluster, weft://HOST:PORT.") var source: String
    @Argument(help: "Volume name.") var name: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try withClusterHub(source) { hub in
            let map = try fetchMap(hub)
            guard let volume = map.volumes[name] else { throw WeftError(ENOENT, "no volume named '\(name)'") }
            let object = volumeObject(volume, map)
            if json {
                try printJSON(object)
            } else {
                try printFields(object)
            }
        }
    }
}

struct HubCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hub", abstract: "Show the hubs of a cluster.",
        discussion: "SOURCE is any hub of the cluster: weft://HOST:PORT.",
        subcommands: [HubList.self, HubShow.self])
}

struct HubList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the hubs of the cluster, live or not.")

    @Argument(help: "Any hub of the cluster, weft://HOST:PORT.") var source: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try withClusterHub(source) { hub in
            let map = try fetchMap(hub)
            let names = Set(map.hubIDs.keys).union(map.hubs.keys).sorted()
            if json {
                try printJSON(["hubs": names.map { hubObject($0, map) }, "revision": map.revision])
            } else {
                for name in names {
                    let live = map.hubs[name]
                    print("\(name)\tid \(map.hubIDs[name] ?? 0)\t\(live?.address ?? "down")")
                }
            }
        }
    }
}

struct HubShow: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show one hub.")

    @Argument(help: "Any hub of the cluster, weft://HOST:PORT.") var source: String
    @Argument(help: "Hub name.") var name: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try withClusterHub(source) { hub in
            let map = try fetchMap(hub)
            guard map.hubIDs[name] != nil || map.hubs[name] != nil else { throw WeftError(ENOENT, "no hub named '\(name)'") }
            let object = hubObject(name, map)
            if json {
                try printJSON(object)
            } else {
                try printFields(object)
            }
        }
    }
}
